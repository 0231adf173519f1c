"""``modelc serve``: the OpenAI-compatible server, started on one engine (or every rank of one under mpirun)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import click

from compiler_core.cli.options import option
from compiler_core.errors import UsageError
from compiler_core.host import Host

INSTALL_HINT = "pip install 'modelc[serve]'"


@click.command("serve")
@option("--engine_dir", required=True, type=click.Path(path_type=Path), help="Engine directory from `modelc build`.")
@option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback unless you open it).")
@option("--port", default=8000, show_default=True, type=int, help="Port to listen on (0: any free port).")
@option(
    "--max_batch_size",
    default=None,
    type=int,
    help="Sequences decoded at once, one KV-cache slot each [default: the engine's max_batch_size].",
)
@option(
    "--max_queue",
    default=64,
    show_default=True,
    type=int,
    help="Sequences waiting for a slot; past this, requests get HTTP 429.",
)
@option(
    "--max_seq_len",
    default=None,
    type=int,
    help="Longest prompt + output per sequence, at most the engine's [default: the engine's max_seq_len].",
)
@option(
    "--prefill_chunk",
    default=128,
    show_default=True,
    type=int,
    help="Prompt tokens prefilled per decode step (chunked prefill: a newcomer never stalls the batch longer).",
)
@option(
    "--api_key", default=None, envvar="MODELC_API_KEY", help="Require 'Authorization: Bearer KEY' (not on /health)."
)
@option("--served_model_name", default=None, help="The model's name in the API [default: the engine directory's name].")
@option(
    "--tokenizer_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Tokenizer directory [default: the engine's tokenizer/].",
)
@option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@option(
    "--shutdown_timeout",
    default=10.0,
    show_default=True,
    type=float,
    help="On SIGTERM/SIGINT, seconds to let running requests finish before aborting them.",
)
@click.pass_obj
def serve_command(
    modelc_host: Host,
    engine_dir: Path,
    host: str,
    port: int,
    max_batch_size: int | None,
    max_queue: int,
    max_seq_len: int | None,
    prefill_chunk: int,
    api_key: str | None,
    served_model_name: str | None,
    tokenizer_dir: Path | None,
    device: str,
    shutdown_timeout: float,
) -> None:
    """Serve an engine over an OpenAI-compatible HTTP API with in-flight batching.

    POST /v1/completions and /v1/chat/completions (stream: true for server-sent events), GET
    /v1/models and /health. Prints one line once it accepts requests; SIGTERM or Ctrl-C stops
    accepting, lets running requests finish (up to --shutdown_timeout) and exits 0. Under
    `mpirun -n W` rank 0 serves HTTP and every rank steps the same batch.
    """
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401  (checked before the engine loads)
    except ImportError as exc:
        raise UsageError(f"modelc serve needs uvicorn and starlette ({exc.name} is missing): {INSTALL_HINT}") from None
    from compiler_core.build.engine import engine_checkpoint, read_engine_config
    from compiler_core.runtime.open import load_tokenizer, mpi_rank, open_runner, special_ids, stop_ids
    from compiler_core.serve.protocol import ServedModel
    from compiler_core.serve.server import serve

    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: expected 0..65535")
    for name, value in (("--max_queue", max_queue), ("--prefill_chunk", prefill_chunk)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if shutdown_timeout < 0:
        raise UsageError(f"--shutdown_timeout must be >= 0, got {shutdown_timeout}")
    engine_config = read_engine_config(Path(engine_dir))
    build = engine_config["build"]
    max_batch_size = _within(max_batch_size, build["max_batch_size"], "--max_batch_size")
    max_seq_len = _within(max_seq_len, build["max_seq_len"], "--max_seq_len")
    tokenizer = load_tokenizer(engine_dir, tokenizer_dir)
    _, pad_id = special_ids(engine_config, tokenizer)
    model = ServedModel(
        name=served_model_name or Path(engine_dir).resolve().name,
        tokenizer=tokenizer,
        vocab_size=int(engine_checkpoint(engine_config).model["vocab_size"]),
        max_input_len=min(int(build["max_input_len"]), max_seq_len),
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        end_ids=stop_ids(engine_config, tokenizer),
    )
    listener = _listen(host, port) if mpi_rank() == 0 else None
    runner, _ = open_runner(Path(engine_dir), device, modelc_host.registry)
    if not runner.supports_rows:
        raise UsageError(
            f"{engine_dir}: the {engine_config.get('backend', '?')} backend cannot run one cache row at a time, "
            "which in-flight batching needs; serve a torch engine (modelc build --backend torch)"
        )
    slots_args = (runner, max_batch_size, 2 * max_seq_len, pad_id or 0)
    if runner.mapping.world_size == 1:
        from compiler_core.serve.slots import SlotRunner

        serve(listener, model, SlotRunner(*slots_args), prefill_chunk, max_queue, api_key, shutdown_timeout)
        return
    from compiler_core.serve.ranks import LeaderSlots, call_group, follow

    group = call_group()
    if mpi_rank() != 0:
        from compiler_core.serve.slots import SlotRunner

        # Rank 0 decides when serving ends; a signal that mpirun forwards here must not cut it short.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        follow(SlotRunner(*slots_args), group)
        return
    leader = LeaderSlots(*slots_args, group)
    try:
        serve(listener, model, leader, prefill_chunk, max_queue, api_key, shutdown_timeout)
    finally:
        leader.close()


def _within(value: int | None, limit: int, flag: str) -> int:
    if value is None:
        return int(limit)
    if not 1 <= value <= limit:
        raise UsageError(f"{flag} {value}: expected 1..{limit} (the engine's build limit)")
    return value


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the engine loads so that a taken port fails fast."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock
