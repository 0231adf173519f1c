"""``modelc verify``: a converted checkpoint beside transformers on the same inputs."""

from __future__ import annotations

from pathlib import Path

import click

from compiler_core.cli.options import POSITIVE_INT, FiniteFloat, option
from compiler_core.errors import ModelcError, UsageError
from compiler_core.host import Host


def parse_ids(values: tuple[str, ...]) -> list[list[int]]:
    """``("1,2,3", "4,5")`` -> ``[[1, 2, 3], [4, 5]]``."""
    rows = []
    for value in values:
        try:
            rows.append([int(t) for t in value.replace(" ", "").split(",") if t])
        except ValueError:
            raise UsageError(f"--input_ids: {value!r} is not a comma-separated list of integers") from None
    return rows


@click.command("verify")
@option("--model_dir", required=True, type=click.Path(path_type=Path), help="The Hugging Face checkpoint converted.")
@option("--checkpoint_dir", required=True, type=click.Path(path_type=Path), help="The modelc checkpoint to check.")
@option("--device", default="cpu", show_default=True, help="Where both models run (cpu, cuda, cuda:1, ...).")
@option(
    "--prompts",
    "--input_text",
    multiple=True,
    help="A prompt (repeat for a batch). Default: two built-in prompts of different lengths.",
)
@option("--input_ids", multiple=True, help='Token ids "1,2,3" instead of text (repeat for a batch).')
@option("--steps", default=32, show_default=True, type=POSITIVE_INT, help="Greedy tokens to compare.")
@option(
    "--tolerance",
    default=None,
    type=FiniteFloat(minimum=0),
    help="Max abs logit difference accepted. Default: 1e-4 for float32, 2% (float16) or 8% (bfloat16) "
    "of the largest |logit|.",
)
@click.pass_obj
def verify_command(
    host: Host,
    model_dir: Path,
    checkpoint_dir: Path,
    device: str,
    prompts: tuple[str, ...],
    input_ids: tuple[str, ...],
    steps: int,
    tolerance: float | None,
) -> None:
    """Run every rank of a checkpoint with the reference executor beside transformers.

    Prints the max abs logit difference (prompt and greedy steps) and the greedy-token agreement;
    exits 1 when the difference is outside the dtype's tolerance or a greedy token differs where
    the reference had no near-tie.
    """
    from compiler_core.evaluate.verify import verify

    if prompts and input_ids:
        raise UsageError("--prompts and --input_ids: give one or the other")
    report, batch, config = verify(
        model_dir,
        checkpoint_dir,
        device=device,
        prompts=list(prompts) or None,
        input_ids=parse_ids(input_ids) or None,
        steps=steps,
        tolerance=tolerance,
        registry=host.registry,
    )
    mapping = config.mapping
    click.echo(
        f"verify {checkpoint_dir} ({config.architecture}, {config.dtype}, tp={mapping.tp_size} "
        f"pp={mapping.pp_size}) against transformers on {device}: {len(batch.lengths)} prompts "
        f"({batch.source}, lengths {', '.join(map(str, batch.lengths))}), {steps} greedy steps"
    )
    for line in report.lines():
        click.echo(line)
    if not report.passed:
        raise ModelcError(
            f"verify failed: max abs logit difference {report.max_diff:.3e} (tolerance {report.tolerance:.3e}), "
            f"greedy agreement {report.agreed}/{report.total}"
        )
