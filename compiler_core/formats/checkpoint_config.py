"""The typed checkpoint config: what a checkpoint's ``config.json`` says, validated once when read.

On disk the config is one flat JSON object (the format TensorRT-LLM-style tools expect)::

    {"format": "modelc-checkpoint", "format_version": 1, "architecture": "falcon",
     <the family's fields, as its Architecture.config_from_hf returned them>,
     "dtype": "bfloat16", "mapping": {...}, "quantization": {"quant_algo": ..., ...}}

:class:`CheckpointConfig` splits it into the fields the core owns (architecture, dtype, mapping,
quantization, format_version) and ``model``, the family-specific section that only the
architecture interprets. Both dataclasses are frozen: a stage that changes the config (a
quantization scheme, a re-shard) makes a new one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compiler_core.dtypes import MODEL_DTYPES
from compiler_core.errors import ConfigError
from compiler_core.formats.fields import int_field, is_int
from compiler_core.mapping import Mapping

FORMAT = "modelc-checkpoint"
FORMAT_VERSION = 1

#: The quantization fields every scheme shares; any other key of the section is a scheme's own.
QUANT_FIELDS = ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules")
#: The top-level fields the core owns; every other top-level field belongs to the family section.
CORE_FIELDS = ("format", "format_version", "architecture", "dtype", "mapping", "quantization")
REQUIRED_FIELDS = ("architecture", "dtype", "mapping", "quantization", "format_version")


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's ``quantization`` section.

    ``group_size`` and ``exclude_modules`` are None when the scheme wrote none (full precision,
    an FP8 KV cache alone). ``extras`` holds what one scheme records for itself (AWQ's
    ``scale_groups`` and ``pre_quant_scale_modules``, the calibration summary), kept verbatim;
    treat it as read-only and replace it as a whole.
    """

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    exclude_modules: tuple[str, ...] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, source: str) -> QuantConfig:
        """Read a ``quantization`` object; a bad field is a ConfigError naming ``source`` and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: field 'quantization' must be an object")
        for name in ("quant_algo", "kv_cache_quant_algo"):
            if not isinstance(data.get(name), (str, type(None))):
                raise ConfigError(f"{source}: field 'quantization.{name}' must be a string or null")
        try:
            group_size = int_field(data, "group_size", default=None, minimum=1)
        except ValueError as exc:
            raise ConfigError(f"{source}: quantization {exc}") from None
        exclude = data.get("exclude_modules")
        if exclude is not None and (not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude)):
            raise ConfigError(f"{source}: field 'quantization.exclude_modules' must be a list of strings or null")
        return cls(
            quant_algo=data.get("quant_algo"),
            kv_cache_quant_algo=data.get("kv_cache_quant_algo"),
            group_size=group_size,
            exclude_modules=None if exclude is None else tuple(exclude),
            extras={k: v for k, v in data.items() if k not in QUANT_FIELDS},
        )

    def to_json(self) -> dict[str, Any]:
        """The section as written to config.json (absent optional fields stay absent)."""
        out: dict[str, Any] = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.group_size is not None:
            out["group_size"] = self.group_size
        if self.exclude_modules is not None:
            out["exclude_modules"] = list(self.exclude_modules)
        return {**out, **self.extras}


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint's config.json (also embedded in an engine's config.json as ``checkpoint``).

    ``model`` is the family-specific section: the fields the architecture's ``config_from_hf``
    returned, less ``architecture``; the architecture's methods receive it. Its fields are
    checked where they are used, by building each rank's graph.
    """

    architecture: str
    dtype: str
    mapping: Mapping
    model: dict[str, Any]
    quantization: QuantConfig = field(default_factory=QuantConfig)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_model_fields(
        cls, fields: dict[str, Any], dtype: str, mapping: Mapping, source: str = "config.json"
    ) -> CheckpointConfig:
        """A full-precision config from an architecture's ``config_from_hf`` result (which names the
        architecture), checked as a config.json would be."""
        header = {"format": FORMAT, "format_version": FORMAT_VERSION}
        core = {"dtype": dtype, "mapping": mapping.to_json(), "quantization": {}}
        return cls.from_json({**header, **fields, **core}, source)

    @classmethod
    def from_json(cls, data: Any, source: str) -> CheckpointConfig:
        """Read and check a config.json object; a bad field is one error naming ``source`` and the field.

        ``format`` may be absent (configs written before it existed); ``format_version`` may not.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a checkpoint config must be a JSON object")
        if data.get("format", FORMAT) != FORMAT:
            raise ConfigError(f"{source}: field 'format' is {data['format']!r}, not a {FORMAT} directory")
        for name in REQUIRED_FIELDS:
            if name not in data:
                raise ConfigError(f"{source}: field {name!r} is missing")
        version = data["format_version"]
        if not is_int(version) or version != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {version!r} is not {FORMAT_VERSION}")
        if not isinstance(data["architecture"], str):
            raise ConfigError(f"{source}: field 'architecture' must be a string, got {data['architecture']!r}")
        if not isinstance(data["dtype"], str) or data["dtype"] not in MODEL_DTYPES:
            raise ConfigError(
                f"{source}: field 'dtype' is {data['dtype']!r}, expected one of {', '.join(MODEL_DTYPES)}"
            )
        quantization = QuantConfig.from_json(data["quantization"], source)
        return cls(
            architecture=data["architecture"],
            dtype=data["dtype"],
            mapping=Mapping.from_json(data["mapping"], source),
            model={k: v for k, v in data.items() if k not in CORE_FIELDS},
            quantization=quantization,
            format_version=version,
        )

    def to_json(self) -> dict[str, Any]:
        """The config.json object, in the field order convert has always written."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "architecture": self.architecture,
            **self.model,
            "dtype": self.dtype,
            "mapping": self.mapping.to_json(),
            "quantization": self.quantization.to_json(),
        }
