"""ONNX segment -> serialized TensorRT engine: strongly typed network, two optimization profiles.

Profiles (per symbolic dimension of the ONNX inputs, see ``modelc_plugins.onnx.lowering``):

* 0, prompt: ``seq`` 1..max_input_len with no past (``past_seq`` 0, ``total_seq`` = ``seq``);
* 1, decode: one new token (``seq`` 1) after 0..max_seq_len-1 cached ones.

Each profile is self-consistent (past + seq = total at its min, opt and max), and the prompt
profile keeps attention scores at max_input_len², not max_input_len x max_seq_len.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compiler_core.errors import ModelcError, UsageError
from modelc_plugins.onnx.lowering import BATCH, PAST, SEQ, TOTAL, ValueType
from modelc_plugins.tensorrt.package import INSTALL_HINT, import_tensorrt, make_logger

PROMPT_PROFILE, DECODE_PROFILE = 0, 1
Ranges = dict[str, tuple[int, int, int]]


def profile_ranges(settings: Mapping[str, Any]) -> list[Ranges]:
    """(min, opt, max) of each symbolic dimension, per profile, from the build settings."""
    batch, max_input, max_seq = (int(settings[k]) for k in ("max_batch_size", "max_input_len", "max_seq_len"))
    rows = (1, batch, batch)
    prompt = {BATCH: rows, SEQ: (1, max_input, max_input), PAST: (0, 0, 0), TOTAL: (1, max_input, max_input)}
    half = max_seq // 2
    decode = {BATCH: rows, SEQ: (1, 1, 1), PAST: (0, half, max_seq - 1), TOTAL: (1, half + 1, max_seq)}
    return [prompt, decode]


def shape_range(name: str, vtype: ValueType, ranges: Ranges) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of input ``name`` whose dims are ints or symbolic names."""
    shapes: list[list[int]] = [[], [], []]
    for dim in vtype.dims:
        if isinstance(dim, int):
            bounds = (dim, dim, dim)
        elif dim in ranges:
            bounds = ranges[dim]
        else:
            raise ModelcError(f"input {name}: dimension {dim!r} has no TensorRT profile range")
        for shape, bound in zip(shapes, bounds, strict=True):
            shape.append(bound)
    return tuple(tuple(s) for s in shapes)


def build_serialized(onnx_path: Path, input_types: Mapping[str, ValueType], settings: Mapping[str, Any]) -> bytes:
    """Parse ``onnx_path`` (external data beside it) into a strongly typed network and build it.

    Raises ModelcError naming the file and the parser's or builder's first error, so an
    unsupported op or a type mismatch fails loudly.
    """
    trt = import_tensorrt()
    if trt is None:
        raise UsageError(INSTALL_HINT)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT-RTX and TensorRT 11 are always strongly typed; datacenter TensorRT 10 needs the flag.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = (
            f"node {first.node_name()} ({first.node_operator()}): {first.desc()}" if first else "; ".join(logger.errors)
        )
        raise ModelcError(f"{onnx_path.name}: TensorRT's ONNX parser rejected it: {where}")
    config = builder.create_builder_config()
    for ranges in profile_ranges(settings):
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name not in input_types:
                raise ModelcError(f"{onnx_path.name}: network input {name!r} is not in the rank's plan")
            profile.set_shape(name, *shape_range(name, input_types[name], ranges))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = logger.errors[0] if logger.errors else "no error message"
        raise ModelcError(f"{onnx_path.name}: TensorRT could not build an engine: {detail}")
    return bytes(memoryview(plan))
