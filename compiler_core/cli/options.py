"""Click helpers shared by the commands."""

from __future__ import annotations

from typing import Any

import click


def option(*decls: str, **kwargs: Any):
    """A click option that accepts both ``--model_dir`` and ``--model-dir`` spellings."""
    names: list[str] = []
    for decl in decls:
        names.append(decl)
        if decl.startswith("--"):
            body = decl[2:]
            for alt in (body.replace("_", "-"), body.replace("-", "_")):
                if alt != body and f"--{alt}" not in names:
                    names.append(f"--{alt}")
    return click.option(*names, **kwargs)


def accepted_flag(name: str, help: str, takes_value: bool = False, optional_value: bool = False):
    """A TensorRT-LLM flag accepted for copy-paste compatibility; ``help`` says what it means here.

    ``optional_value`` accepts both the bare flag of older TensorRT-LLM releases
    (``--remove_input_padding``) and the value form of newer ones (``--remove_input_padding enable``).
    """
    if optional_value:
        return option(
            name, is_flag=False, flag_value="enable", default=None, metavar="[VALUE]", help=help, expose_value=False
        )
    if takes_value:
        return option(name, default=None, help=help, expose_value=False)
    return option(name, is_flag=True, default=False, help=help, expose_value=False)
