"""The model a benchmark runs: a named shape with random weights, or a real checkpoint.

Prefill time and memory depend on a model's shape, not on its weight values, so a random-weight
model of LLaMA-2-7B's shape reproduces the IMDC paper's timings without its weights. Random models
have no tokenizer: they are fed token ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import backends
import models
from engine.config import ModelConfig, RopeConfig
from engine.llm import LLM, load, parse_device, parse_dtype
from tools.report import ToolError

SHAPES = {
    "llama2-7b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0),
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    "llama3-8b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0),
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_ids=(128001,),
    ),
    "smollm2-135m": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=100000.0),
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}
DEFAULT_SHAPE = "default"  # the real default model, loaded with its weights and tokenizer
WEIGHT_STD = 0.02


def random_llm(
    shape: str | ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    seed: int = 0,
) -> LLM:
    """An ``LLM`` of ``shape`` (a ``SHAPES`` name or a config) with normal(0, 0.02) weights, built
    directly on ``device``, without a tokenizer."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ToolError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        config = SHAPES[shape]
    else:
        config = shape
    if backend not in backends.available():
        raise ToolError(f"unknown backend {backend!r}; known: {', '.join(backends.available())}")
    device = torch.device(device)
    backends.prepare_triton()  # before the model is built: building it may import triton
    with torch.device("meta"):
        model = models.build(config)
    model = model.to(dtype).to_empty(device=device).requires_grad_(False)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.fill_(1.0)  # norm weights
            else:
                parameter.normal_(0.0, WEIGHT_STD, generator=generator)
    name = shape if isinstance(shape, str) else "custom"
    return LLM(
        Path(f"random:{name}"), config, model.eval(), None, backend=backend, device=device, dtype=dtype
    )


def add_model_options(parser: argparse.ArgumentParser, *, shapes: bool) -> None:
    """--model (a checkpoint directory), --backend, --dtype, --device; --shape too when ``shapes``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "-m", "--model", metavar="DIR", help="checkpoint directory (default: the default model)"
    )
    if shapes:
        group.add_argument(
            "--shape",
            default=DEFAULT_SHAPE,
            help=f"random-weight model shape: {', '.join(SHAPES)}; or {DEFAULT_SHAPE!r}, the real default "
            f"model (default: %(default)s; --model overrides it)",
        )
    group.add_argument(
        "--backend", default="auto", help=f"attention backend: {', '.join(backends.available())}"
    )
    group.add_argument(
        "--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's; random shapes: bf16 on GPU)"
    )
    group.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def load_from_args(args: argparse.Namespace) -> LLM:
    """The model the options name: ``--model``, else a random ``--shape``, else the default model."""
    device = parse_device(args.device)
    shape = getattr(args, "shape", DEFAULT_SHAPE)
    if args.model is None and shape != DEFAULT_SHAPE:
        fallback = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = parse_dtype(args.dtype, "--dtype") or fallback
        return random_llm(shape, dtype=dtype, device=device, backend=args.backend)
    return load(args.model, backend=args.backend, dtype=args.dtype, device=device)


def describe(llm: LLM) -> dict[str, object]:
    """The model facts a report records."""
    c = llm.config
    return {
        "model": llm.path.name,
        "model_path": str(llm.path),
        "layers": c.num_layers,
        "hidden": c.hidden_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab": c.vocab_size,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "backend": llm.backend,
    }
