"""Load safetensors checkpoints (single file or sharded) into a model built from its config.

Tensors are read one at a time through ``safe_open`` (memory-mapped), so peak memory is the model
plus one tensor. Pickle-based weights (``.bin``, ``.pt``) are never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import models
from engine import gguf
from engine.config import ModelConfig, load_config, parse_config
from models.llama import Linear
from models.quantized import quantize_model

# Buffers some exporters write that the modules recompute.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """The checkpoint's weights are missing, unreadable, or don't fit the model."""


def load_model(
    directory: Path,
    *,
    dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[ModelConfig, nn.Module]:
    """Build the model ``directory/config.json`` describes and fill it from its safetensors files.

    ``dtype`` is the activations' (default: the checkpoint's); ``weight_dtype`` (default: ``dtype``)
    stores the embedding and linear weights narrower: a float dtype (float16 gives 1.5-2.7x faster
    CPU decode), or "int8" / "int4" (weight-only quantized, ``models.quantized``; CPU only).
    """
    directory = Path(directory)
    if directory.is_file() and directory.suffix.lower() == ".gguf":
        return load_gguf(gguf.read(directory), dtype=dtype, weight_dtype=weight_dtype, device=device)
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file; -m takes a checkpoint directory (config.json, *.safetensors) "
            "or a .gguf file"
        )
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} not found")
    config = load_config(directory, models.available())
    files = checkpoint_files(directory)
    dtype = dtype or checkpoint_dtype(config, files)
    model = empty_model(config, dtype, weight_dtype, device)
    load_weights(model, files, tied=config.tie_word_embeddings)
    if isinstance(weight_dtype, str):
        quantize_model(model, weight_dtype, dtype)
    return config, model.eval()


def load_gguf(
    checkpoint: gguf.GGUFCheckpoint,
    *,
    dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[ModelConfig, nn.Module]:
    """Build the model of a Llama GGUF file directly, keeping its quantization where our kernels can:
    4-bit linear layers (Q4_0, Q4_1, Q4_K) as int4, other quantized ones as int8, F16 as float16;
    ``weight_dtype`` chooses otherwise. Tensors are mapped and q/k rows reordered as ``tools.convert_gguf``
    does (``engine.gguf``)."""
    config = parse_config(checkpoint.config, checkpoint.generation_config, architectures=models.available())
    dtype = dtype or torch.float32
    if weight_dtype is None:
        weight_dtype = gguf.native_format(checkpoint.storage())
        if isinstance(weight_dtype, str) and torch.device(device).type != "cpu":
            weight_dtype = None  # quantized kernels are the CPU's: keep the activations' dtype
    model = empty_model(config, dtype, weight_dtype, device)
    weights = checkpoint.weights()
    fill_weights(
        model, ((checkpoint.name, name, lambda t=tensor: t) for name, tensor in weights.items()),
        tied=config.tie_word_embeddings,
    )  # fmt: skip
    del weights
    if isinstance(weight_dtype, str):
        quantize_model(model, weight_dtype, dtype)
    return config, model.eval()


def empty_model(
    config: ModelConfig,
    dtype: torch.dtype,
    weight_dtype: torch.dtype | str | None,
    device: torch.device | str,
) -> nn.Module:
    """The model ``config`` describes, its tensors allocated (uninitialised) on ``device``: activations
    in ``dtype``, embedding and linear weights in a float ``weight_dtype`` (quantized forms are made
    from the loaded float weights)."""
    if isinstance(weight_dtype, str) and torch.device(device).type != "cpu":
        raise CheckpointError(
            f"{weight_dtype} weights run on the CPU only; use --device cpu or a float dtype"
        )
    with torch.device("meta"):
        model = models.build(config)
    model = model.to(dtype)
    if isinstance(weight_dtype, torch.dtype):
        for module in model.modules():
            if isinstance(module, (Linear, nn.Embedding)):
                module.to(weight_dtype)
    model = model.to_empty(device=device).requires_grad_(False)
    model.tie_weights()
    return model


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is malformed ({error}); re-download it") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{directory} has only pickle-based weights ({', '.join(pickled)}), which are never loaded "
            "because unpickling can run arbitrary code; convert them to safetensors on a trusted machine "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(f"no *.safetensors weights found in {directory}")


def checkpoint_dtype(config: ModelConfig, files: list[Path]) -> torch.dtype:
    if config.torch_dtype in DTYPES:
        return DTYPES[config.torch_dtype]
    with _open(files[0]) as reader:
        for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
            dtype = reader.get_slice(name).get_dtype()
            return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(
                dtype, torch.float32
            )
    return torch.float32


def load_weights(model: nn.Module, files: list[Path], *, tied: bool) -> None:
    """Fill ``model`` from safetensors ``files``, reading each tensor only when it has a place."""

    def tensors() -> Iterator[tuple[str, str, Callable[[], torch.Tensor]]]:
        for path in files:
            with _open(path) as reader:
                for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield (
                        path.name,
                        name,
                        lambda reader=reader, path=path, name=name: _read(reader, path, name),
                    )

    fill_weights(model, tensors(), tied=tied)


def fill_weights(
    model: nn.Module, tensors: Iterable[tuple[str, str, Callable[[], torch.Tensor]]], *, tied: bool
) -> None:
    """Copy every (source, name, read) tensor into its place: each place written once, each tensor
    used or ignored."""
    places = parameter_places(model)
    written: set[str] = set()
    unexpected: list[str] = []
    for source, name, read in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in places:
            unexpected.append(name)
            continue
        if name in written:
            raise CheckpointError(f"tensor {name!r} appears in more than one shard")
        tensor = read()
        target = places[name]
        if tensor.shape != target.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(target.shape)}; config.json and the weights disagree"
            )
        target.copy_(tensor)
        written.add(name)
    missing = sorted(set(places) - written)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors: {_listing(missing)}")
        if unexpected:
            problems.append(f"tensors the model does not use: {_listing(unexpected)}")
        raise CheckpointError(
            f"checkpoint does not match the {type(model).__name__} modules; " + "; ".join(problems)
        )


def parameter_places(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the tensor it fills: a parameter, or rows of a fused one.

    ``model.packed_modules`` maps a checkpoint module name to (fused module name, part index); the
    fused module's ``parts`` give each part's rows.
    """
    fused: dict[str, list[tuple[str, int]]] = {}
    for source, (target, index) in getattr(model, "packed_modules", {}).items():
        fused.setdefault(target, []).append((source, index))
    places = {}
    for name, parameter in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        owner, _, module_name = module_path.rpartition(".")
        if module_name not in fused:
            places[name] = parameter
            continue
        parts = model.get_submodule(module_path).parts
        for source, index in fused[module_name]:
            start = sum(parts[:index])
            places[f"{owner}.{source}.{leaf}"] = parameter[start : start + parts[index]]
    return places


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types from Rust
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt: "
            "re-download or re-convert it"
        ) from None


def _read(reader, path: Path, name: str) -> torch.Tensor:
    try:
        return reader.get_tensor(name)
    except Exception as error:
        raise CheckpointError(
            f"{path}: cannot read tensor {name!r} ({error}); the file may be truncated"
        ) from None


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
