"""Errors the CLI turns into one line on stderr and an exit code.

Each class's docstring is its entry in docs/ERRORS.md: a first line that says what went wrong,
then ``Cause:`` and ``What to do:`` paragraphs. :func:`errors_markdown` renders them, and a test
keeps docs/ERRORS.md equal to what it renders, so the document cannot drift from the code.
"""

from __future__ import annotations

import inspect


class ModelcError(Exception):
    """A run-time failure: the input was acceptable but the work could not be done.

    Cause: something failed while modelc was working (a device, a worker process, a plugin).
    The message names the rank, file or step.

    What to do: read the message; if it points at modelc itself, rerun with ``modelc --debug``
    and report the traceback.
    """

    exit_code = 1
    #: True when another process reports the same error (an mpirun rank other than 0): exit silently.
    quiet = False


class UsageError(ModelcError):
    """Bad input: a file, field, flag or value.

    Cause: a command-line value or an input that modelc refuses; the message names it.

    What to do: correct the named flag, file or value and run the command again.
    """

    exit_code = 2


class OptionError(UsageError):
    """A command-line value is out of range, not finite, or of the wrong kind.

    Cause: for example ``--temperature nan``, ``--top_p 1.5``, ``--pad_id -1``, ``--group_size 0``,
    ``--tp_size 0``, or a flag that click itself refuses (missing, unknown, not a number).

    What to do: give the flag a value in the range the message states (``modelc COMMAND --help``
    lists every flag).
    """


class ConfigError(UsageError):
    """A config.json (Hugging Face, checkpoint or engine) has a missing, mistyped or inconsistent field.

    Cause: a required field is absent, a field has the wrong JSON type (a list where an integer
    belongs, a string where a number belongs), a size or count is zero or negative, fields
    contradict each other (``hidden_size`` not a multiple of ``num_attention_heads``), a tensor's
    shape disagrees with what the config implies, or the format version is not one this modelc reads.

    What to do: fix the named field in the named file, or regenerate the directory with the
    command that made it (``modelc convert``/``quantize`` for checkpoints, ``modelc build`` for engines).
    """


class WeightFileError(UsageError):
    """A weight file (safetensors or PyTorch .bin) is malformed, truncated, unreadable or holds the wrong tensors.

    Cause: the safetensors header is not a bounded JSON object of well-formed entries (dtype name,
    shape, data offsets inside the file, not overlapping, covering the data), a tensor the model
    needs is missing or has the wrong dtype, a .bin file pickles more than tensors, or the file
    cannot be read (permissions).

    What to do: re-download or re-save the named file (``save_pretrained`` writes valid shards);
    check its permissions.
    """


class IndexFileError(UsageError):
    """A ``*.index.json`` shard index is malformed or disagrees with the shards beside it.

    Cause: the index is not a JSON object with a ``weight_map`` of tensor name -> shard file, it
    names a shard that is missing, or a tensor its shard does not hold.

    What to do: restore the shard the message names, or regenerate the index with ``save_pretrained``.
    """


class UnsafePathError(UsageError):
    """A path read from a model directory leads outside it.

    Cause: an index names a shard by an absolute path or through ``..``, or a shard is a symlink
    that resolves outside the model directory (and outside its Hugging Face cache repository,
    whose ``snapshots/<rev>/`` files may link to ``../../blobs/``).

    What to do: copy the real files into the model directory; modelc does not follow paths out of it.
    """


class OutputPathError(UsageError):
    """An output path cannot be written: it is the wrong kind of file, or its parent is not a writable directory.

    Cause: ``--output_dir`` or ``--output_json`` names an existing file of the other kind, or a path
    below a regular file or inside a directory that cannot be written.

    What to do: choose an output path in a writable directory.
    """


class TokenizerError(UsageError):
    """No usable tokenizer where one is needed.

    Cause: the model (or engine) directory holds no tokenizer files, or they cannot be loaded.

    What to do: pass ``--tokenizer_dir`` with the model's Hugging Face tokenizer directory (``modelc
    quantize``, ``run``, ``summarize``), or give ``modelc run`` its prompts as token ids (``--input_ids``).
    """


class MissingDependencyError(UsageError):
    """An optional package that this input needs is not installed.

    Cause: for example a parquet dataset without pyarrow, or text input without transformers.

    What to do: install the extra the message names, e.g. ``pip install 'modelc[summarize]'``.
    """


class ConcurrentWriteError(ModelcError):
    """Another run finished into the same output directory first.

    Cause: two runs wrote the same ``--output_dir`` at the same moment; the one that finished
    first keeps its complete output and the other stops with this error.

    What to do: nothing is lost; rerun if you meant this run's output to be the one kept, or give
    concurrent runs different output directories.
    """


class InternalError(ModelcError):
    """An unexpected exception inside modelc or a plugin (a bug, not your input).

    Cause: an exception that no validation anticipated; the message names its type and text.

    What to do: rerun with ``modelc --debug ...`` to see the traceback and report it.
    """


def error_line(exc: BaseException) -> str:
    """The one stderr line for ``exc``: ``modelc: error: ...`` with any line breaks folded into spaces."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"modelc: error: {text}"


def unexpected(exc: BaseException) -> InternalError:
    """The last-resort wrapper of an exception that is not a ModelcError."""
    text = " ".join(str(exc).split())
    return InternalError(
        f"internal error: {type(exc).__name__}{': ' + text if text else ''}; rerun with --debug for the traceback"
    )


def error_classes() -> list[type[ModelcError]]:
    """ModelcError and every subclass defined in this module, parents before children."""
    found: list[type[ModelcError]] = []

    def walk(cls: type[ModelcError]) -> None:
        if cls.__module__ == __name__ and cls not in found:
            found.append(cls)
            for sub in cls.__subclasses__():
                walk(sub)

    walk(ModelcError)
    return found


def errors_markdown() -> str:
    """docs/ERRORS.md, rendered from the error classes' docstrings and exit codes."""
    lines = [
        "# modelc errors",
        "",
        "Every error is one line on stderr, `modelc: error: <file, field or value>: <what is wrong>`, and an",
        "exit code: 2 for bad input, 1 for a failure at run time. `modelc --debug ...` adds the traceback.",
        "Any other exception is reported as an internal error in one line with the advice to rerun with",
        "`--debug`. Interrupts exit 130 (SIGINT) or 143 (SIGTERM).",
        "",
        "Generated from `compiler_core/errors.py` by `python -m compiler_core.errors > docs/ERRORS.md`;",
        "a test checks that this file matches the classes.",
        "",
    ]
    for cls in error_classes():
        summary, _, body = inspect.getdoc(cls).partition("\n")
        base = cls.__base__.__name__ if cls is not ModelcError else "Exception"
        lines += [f"## {cls.__name__}", "", f"Exit code {cls.exit_code}; a kind of `{base}`. {summary}", ""]
        lines += [body.strip(), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(errors_markdown(), end="")
