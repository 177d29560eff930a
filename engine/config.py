"""Read a checkpoint's ``config.json`` (and ``generation_config.json``) into a ``ModelConfig``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The checkpoint's configuration is missing, malformed or describes something we can't run."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


ROPE_KINDS = ("default", "linear", "llama3")
_REQUIRED_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def load_config(directory: Path, architectures: Sequence[str]) -> ModelConfig:
    """Parse ``directory/config.json``; refuse architectures, rope types and options we can't run."""
    path = Path(directory) / "config.json"
    raw = read_json_object(path)
    if raw is None:
        raise ConfigError(f"{path} not found: a checkpoint directory needs config.json")
    generation = read_json_object(Path(directory) / "generation_config.json")
    return parse_config(raw, generation, architectures=architectures)


def parse_config(
    raw: dict[str, Any], generation: dict[str, Any] | None = None, *, architectures: Sequence[str]
) -> ModelConfig:
    """The config of ``raw`` (config.json's object), for one of the ``architectures`` we can build."""
    names = raw.get("architectures") or []
    known = list(architectures)
    architecture = next((name for name in names if name in known), None)
    if architecture is None:
        shown = ", ".join(names) if names else f"model_type {raw.get('model_type')!r}"
        raise ConfigError(f"unsupported architecture {shown}; supported: {', '.join(known)}")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ConfigError(f"{flag}=true is not supported by the {architecture} modules")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported; only 'silu'")

    try:
        sizes = {name: int(raw[name]) for name in _REQUIRED_SIZES}
        heads = sizes["num_attention_heads"]
        sizes["num_key_value_heads"] = int(raw.get("num_key_value_heads") or heads)
        sizes["max_position_embeddings"] = int(raw.get("max_position_embeddings", 4096))
        if raw.get("head_dim"):
            sizes["head_dim"] = int(raw["head_dim"])
        for name, value in sizes.items():
            if value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value}")
        hidden, kv_heads = sizes["hidden_size"], sizes["num_key_value_heads"]
        eps = float(raw.get("rms_norm_eps", 1e-6))
        if not eps > 0:
            raise ConfigError(f"config.json: rms_norm_eps must be positive, got {eps}")
        config = ModelConfig(
            architecture=architecture,
            vocab_size=sizes["vocab_size"],
            hidden_size=hidden,
            intermediate_size=sizes["intermediate_size"],
            num_layers=sizes["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=sizes.get("head_dim") or hidden // heads,
            rms_norm_eps=eps,
            rope=_rope_config(raw),
            max_position_embeddings=sizes["max_position_embeddings"],
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw, generation or {}),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )
    except KeyError as missing:
        raise ConfigError(f"config.json lacks the required field {missing.args[0]!r}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config.json has a malformed field: {error}") from None
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if config.head_dim % 2:
        raise ConfigError(f"head_dim {config.head_dim} is odd; rotary embeddings need an even head size")
    return config


def read_json_object(
    path: Path, error: type[ValueError] = ConfigError, remedy: str = "re-download or re-convert it"
) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is no such file; anything else raises ``error``
    (saying what to do: ``remedy``)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem}); {remedy}") from None
    if not isinstance(data, dict):
        raise error(f"{path} should hold a JSON object; {remedy}")
    return data


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    # transformers v5 moves rope_theta and the scaling dict into one "rope_parameters" dict.
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, dict) and parameters and all(isinstance(v, dict) for v in parameters.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported by Llama/Mistral modules")
    scaling = dict(parameters or raw.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ROPE_KINDS:
        raise ConfigError(f"unsupported rope type {kind!r}; supported: {', '.join(ROPE_KINDS)}")
    if kind == "default":
        return RopeConfig(theta=theta)
    factor = float(scaling["factor"])
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=factor)
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=factor,
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_positions=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if window is None or raw.get("use_sliding_window") is False:
        return None
    if int(window) <= 0:
        raise ConfigError(f"config.json: sliding_window must be a positive number of tokens, got {window}")
    return int(window)


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (raw, generation):
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)
