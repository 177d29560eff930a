"""Tiny random Llama / Mistral checkpoints written by the tests themselves (transformers is test-only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Long context inference keeps a bounded memory of keys and values.",
    "0123456789 Paris is the capital of France; Rome is the capital of Italy.",
    "def f(x):\n    return x * 2  # code, with symbols: {}[]()<>=+-*/",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def write_tiny_checkpoint(
    directory: Path, architecture: str = "llama", seed: int = 0, **overrides: Any
) -> Path:
    """A random-weight checkpoint (config.json, model.safetensors, tokenizer files) in ``directory``."""
    import transformers

    settings = {**LLAMA, **overrides}
    if architecture == "llama":
        config = transformers.LlamaConfig(**settings)
        model_class = transformers.LlamaForCausalLM
    elif architecture == "mistral":
        config = transformers.MistralConfig(**settings)
        model_class = transformers.MistralForCausalLM
    else:
        raise ValueError(architecture)
    torch.manual_seed(seed)
    model = model_class(config).float()
    with torch.no_grad():  # default init is tiny; wider weights make attention patterns non-trivial
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    write_tiny_tokenizer(directory, settings["vocab_size"])
    return directory


def write_tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "chat_template": CHATML,
            }
        )
    )


def hf_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    """Reference logits from transformers (eager attention, float32) for one sequence [L, V]."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def write_calibration(llm: Any, seed: int = 0) -> Path:
    """A calibration file for ``llm``'s checkpoint with seeded random head tables (what the head-wise
    policies read), as ``tools.find_heads`` would write it."""
    from engine import calibration

    c = llm.config
    generator = torch.Generator().manual_seed(seed)

    def table(heads: int) -> list[list[float]]:
        return torch.rand(c.num_layers, heads, generator=generator).tolist()

    data = {
        "format": calibration.FORMAT,
        "model": calibration.identity(llm),
        "reform": {"heads": [[0, "k", 0], [c.num_layers - 1, "q", 1]]},
        "razor": {"induction": table(c.num_kv_heads), "echo": table(c.num_kv_heads)},
        "duo": {"proxy": table(c.num_kv_heads)},
        "compresskv": {
            "retrieval": table(c.num_heads),
            "layer_error": torch.rand(c.num_layers, generator=generator).tolist(),
        },
        "pod": {
            "similarity": torch.rand(c.num_kv_heads, c.num_layers, c.num_layers, generator=generator).tolist()
        },
    }
    path = Path(llm.path) / calibration.CHECKPOINT_FILE
    path.write_text(json.dumps(data))
    return path
