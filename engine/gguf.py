"""Convert a Llama-architecture GGUF file into a Hugging Face style checkpoint directory.

``convert(SRC.gguf, OUT_DIR)`` (the command line: ``python -m tools.convert_gguf SRC.gguf OUT_DIR``)
writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32), ``tokenizer.json``
and ``tokenizer_config.json``, which both this engine and Hugging Face ``transformers`` load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from engine.notices import notice

# Written last into a finished conversion; bump the version when the output format changes so that
# caches built by an older converter are rebuilt.
MARKER_FILE = "converted_from_gguf.json"
CONVERTER_VERSION = 1


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted; the message says why and what to do."""


class GGUFFileNotFoundError(FileNotFoundError):
    """The GGUF file to convert does not exist."""


_MISSING = object()

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

# Texts that llama.cpp also treats as "end of generation" when they are control tokens.
_END_OF_TURN_TEXTS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenization:
    digits_alone: bool  # every digit is its own pre-token before the word regex runs
    split_regex: str
    ignore_merges: bool  # a pre-token that is itself in the vocabulary is taken whole


_GPT2 = _PreTokenization(digits_alone=False, split_regex=_GPT2_SPLIT, ignore_merges=False)
_STARCODER = _PreTokenization(digits_alone=True, split_regex=_GPT2_SPLIT, ignore_merges=False)
_LLAMA3 = _PreTokenization(digits_alone=False, split_regex=_LLAMA3_SPLIT, ignore_merges=True)
_LLAMA3_MERGING = _PreTokenization(digits_alone=False, split_regex=_LLAMA3_SPLIT, ignore_merges=False)

# ``tokenizer.ggml.pre`` values, grouped as llama.cpp groups them. An unknown value is refused rather
# than guessed: a wrong pre-tokenizer silently produces different ids and degrades every answer.
_PRE_TOKENIZATIONS = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone"), _STARCODER),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _LLAMA3_MERGING),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def convert(src: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Convert the GGUF file ``src`` into the checkpoint directory ``out_dir`` and return it.

    The files are written into a temporary sibling directory that is renamed to ``out_dir`` only
    once complete, so an interrupted conversion leaves nothing half-written behind.
    """
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFConversionError(f"{out_dir} already exists and is not empty: remove it or choose another")
    checkpoint = read(src)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        save_file(checkpoint.weights(progress), str(staging / "model.safetensors"))
        checkpoint.tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "config.json", checkpoint.config)
        _write_json(staging / "generation_config.json", checkpoint.generation_config)
        _write_json(staging / "tokenizer_config.json", checkpoint.tokenizer_config)
        _write_json(staging / MARKER_FILE, conversion_marker(src))
        _allow_reading(staging)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked above; rename cannot replace a directory on every OS
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


@dataclass
class GGUFCheckpoint:
    """A GGUF file read as a Hugging Face style checkpoint: what ``convert`` writes, and what
    ``engine.load`` builds a model from directly."""

    name: str  # the file's name
    reader: gguf.GGUFReader
    config: dict[str, Any]  # config.json
    generation_config: dict[str, Any]
    tokenizer: Tokenizer  # tokenizer.json
    tokenizer_config: dict[str, Any]  # with the chat template

    def weights(self, progress: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor under its Hugging Face name, dequantized to float32, q/k rows in HF order."""
        return _hf_weights(self.reader, self.config, progress)

    def storage(self) -> dict[str, str]:
        """How the file stores each tensor (Hugging Face name -> GGML type name, e.g. "Q4_1")."""
        layers = self.config["num_hidden_layers"]
        return {_hf_name(tensor.name, layers): tensor.tensor_type.name for tensor in self.reader.tensors}


FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def native_format(storage: dict[str, str]) -> torch.dtype | str:
    """The weight format closest to how the file stores its linear layers: "int4" when all are 4-bit,
    "int8" when all are quantized (5-, 6- and 8-bit ones are kept as int8, said once), else the
    widest float type among them."""
    linear = {name: kind for name, kind in storage.items() if name.endswith("proj.weight")}
    kinds = set(linear.values())
    if kinds and kinds <= set(FOUR_BIT):
        return "int4"
    if kinds and not kinds & set(FLOAT_TYPES):
        wider = sorted(kinds - set(FOUR_BIT) - {"Q8_0"})
        if wider:
            notice(
                f"the GGUF's {', '.join(wider)} weights have no kernel of their own here; they run as int8"
            )
        return "int8"
    floats = [FLOAT_TYPES[kind] for kind in kinds if kind in FLOAT_TYPES]
    return max(floats, key=lambda dtype: torch.finfo(dtype).bits, default=torch.float32)


def read(src: Path) -> GGUFCheckpoint:
    """Read a Llama GGUF file's metadata, vocabulary and tensor index (the tensors stay on disk)."""
    reader = _open(Path(src))
    metadata = _Metadata(reader)
    config = _model_config(metadata, reader)
    tokenizer, tokenizer_config, generation_config = _tokenizer_files(metadata, config)
    stop_ids = generation_config["eos_token_id"]
    config["bos_token_id"] = generation_config["bos_token_id"]
    config["eos_token_id"] = stop_ids[0] if isinstance(stop_ids, list) else stop_ids
    return GGUFCheckpoint(Path(src).name, reader, config, generation_config, tokenizer, tokenizer_config)


def conversion_marker(src: Path) -> dict[str, Any]:
    """What a finished conversion of ``src`` records, so a cache can tell whether it is current."""
    return {"source": src.name, "source_bytes": src.stat().st_size, "converter_version": CONVERTER_VERSION}


def _allow_reading(directory: Path) -> None:
    """Give the staging directory (mkdtemp makes it private) and its files the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _open(src: Path) -> gguf.GGUFReader:
    if not src.is_file():
        raise GGUFFileNotFoundError(f"no GGUF file at {src}: check the path")
    try:
        return gguf.GGUFReader(src)
    except Exception as error:  # the reader fails in many ways (bad magic, short reads, reshapes)
        raise GGUFConversionError(
            f"cannot read {src} as a GGUF file ({type(error).__name__}: {error}); "
            "it is truncated, corrupt or not a GGUF file: copy or download it again"
        ) from None


class _Metadata:
    """Typed access to a GGUF file's key/value metadata with clear errors for absent keys."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFConversionError(
                    f"the GGUF file lacks the metadata key {key!r}: it cannot be converted"
                )
            return default
        return field.contents()


def _model_config(metadata: _Metadata, reader: gguf.GGUFReader) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFConversionError(
            f"the GGUF architecture is {arch!r}; only 'llama' GGUF files (Llama, Mistral, SmolLM...) "
            "are supported"
        )
    if metadata.get("llama.expert_count", 0):
        raise GGUFConversionError("mixture-of-experts 'llama' GGUF files (Mixtral) are not supported")
    hidden = metadata.get("llama.embedding_length")
    heads = metadata.get("llama.attention.head_count")
    kv_heads = metadata.get("llama.attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise GGUFConversionError("per-layer head counts are not supported by the Llama architecture")
    head_dim = metadata.get("llama.attention.key_length", hidden // heads)
    if metadata.get("llama.attention.value_length", head_dim) != head_dim:
        raise GGUFConversionError("key and value head sizes differ; the Llama architecture needs them equal")
    if metadata.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise GGUFConversionError("RoPE covers only part of each head; the Llama architecture rotates it all")
    token_embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if token_embd is None:
        raise GGUFConversionError("the GGUF file has no token_embd.weight tensor; it cannot be converted")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": metadata.get("llama.feed_forward_length"),
        "num_hidden_layers": metadata.get("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _float32(metadata.get("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(metadata.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": metadata.get("llama.context_length"),
        "vocab_size": int(token_embd.shape[-1]),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(metadata)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _float32(value: float) -> float:
    """GGUF stores float32; its shortest decimal form (1e-05, not 9.99999974e-06) is what HF configs hold."""
    return float(str(np.float32(value)))


def _rope_scaling(metadata: _Metadata) -> dict[str, Any] | None:
    kind = metadata.get("llama.rope.scaling.type", None)
    factor = metadata.get("llama.rope.scaling.factor", None)
    if kind is None and metadata.get("llama.rope.scale_linear", None) is not None:
        kind, factor = "linear", metadata.get("llama.rope.scale_linear")
    if kind in (None, "none") or factor is None:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32(factor)}
    if kind == "yarn":
        original = metadata.get("llama.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": _float32(factor), "original_max_position_embeddings": original}
    raise GGUFConversionError(f"RoPE scaling type {kind!r} is not supported (only linear and yarn)")


def _hf_name(gguf_name: str, num_layers: int) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_TENSOR_NAME.fullmatch(gguf_name)
    if match and int(match[1]) < num_layers and match[2] in _BLOCK_TENSORS:
        return f"model.layers.{match[1]}.{_BLOCK_TENSORS[match[2]]}.weight"
    if gguf_name.startswith("rope_freqs"):
        raise GGUFConversionError(
            "the GGUF file carries per-frequency RoPE factors (rope_freqs, Llama 3.1 style); "
            "this converter does not support that RoPE scaling"
        )
    raise GGUFConversionError(f"unexpected tensor {gguf_name!r} in a Llama GGUF file; it cannot be converted")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    per_layer = {
        "input_layernorm": (hidden,),
        "self_attn.q_proj": (q_rows, hidden),
        "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, q_rows),
        "post_attention_layernorm": (hidden,),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }
    for layer in range(config["num_hidden_layers"]):
        for module, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{module}.weight"] = shape
    return shapes


def _hf_weights(reader: gguf.GGUFReader, config: dict[str, Any], progress: bool) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="converting tensors", unit="tensor", disable=not progress):
        name = _hf_name(tensor.name, config["num_hidden_layers"])
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise GGUFConversionError(
                f"tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which cannot be read here; "
                "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants (what the gguf "
                "package dequantizes)"
            ) from None
        # GGUF lists dimensions fastest-varying first; torch lists them slowest first.
        values = np.array(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        if values.shape != expected.get(name):
            raise GGUFConversionError(
                f"tensor {tensor.name!r} has shape {values.shape}; "
                f"the metadata implies {expected.get(name)}: the file is inconsistent"
            )
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            values = rotate_half_rows(values, heads)
        weights[name] = torch.from_numpy(values)
    missing = sorted(expected.keys() - weights.keys())
    if missing:
        raise GGUFConversionError(f"the GGUF file lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    return weights


def rotate_half_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from GGUF's RoPE layout to Hugging Face's.

    llama.cpp rotates adjacent pairs (rows 2i, 2i+1 of a head form one rotation pair), Hugging Face
    rotates halves (rows i and i + head_dim/2), so llama.cpp's converter interleaved each head's two
    halves; this takes them apart again: GGUF row ``2i + j`` of a head becomes row ``j*head_dim/2 + i``.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    pairs = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_files(
    metadata: _Metadata, config: dict[str, Any]
) -> tuple[Tokenizer, dict[str, Any], dict[str, Any]]:
    """The tokenizer, ``tokenizer_config.json`` and ``generation_config.json`` contents."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFConversionError(
            f"the GGUF vocabulary is of type {kind!r}; "
            "only byte-level BPE vocabularies ('gpt2') can be converted"
        )
    pre = metadata.get("tokenizer.ggml.pre", "")
    if pre not in _PRE_TOKENIZATIONS:
        raise GGUFConversionError(
            f"unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
            f"supported: {', '.join(sorted(_PRE_TOKENIZATIONS))}"
        )
    texts: list[str] = metadata.get("tokenizer.ggml.tokens")
    types: list[int] = metadata.get("tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(texts))
    merges: list[str] = metadata.get("tokenizer.ggml.merges")
    if len(types) != len(texts) or len(texts) > config["vocab_size"]:
        raise GGUFConversionError(
            f"the GGUF vocabulary is inconsistent: {len(texts)} tokens, {len(types)} token types, "
            f"{config['vocab_size']} embedding rows"
        )
    template: str | None = metadata.get("tokenizer.chat_template", None)
    bos_id = metadata.get("tokenizer.ggml.bos_token_id", None)
    add_bos = bos_id is not None and bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    stop_ids = _end_of_generation_ids(metadata, texts, types)
    pre_tokenization = _PRE_TOKENIZATIONS[pre]
    tokenizer = _byte_level_bpe(texts, types, merges, pre_tokenization, texts[bos_id] if add_bos else None)

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "eos_token": texts[stop_ids[0]],
    }
    if bos_id is not None:
        tokenizer_config["bos_token"] = texts[bos_id]
    pad_id = metadata.get("tokenizer.ggml.padding_token_id", None)
    if pad_id is not None:
        tokenizer_config["pad_token"] = texts[pad_id]
    if template:
        tokenizer_config["chat_template"] = template
    generation_config = {
        "bos_token_id": bos_id,
        "eos_token_id": stop_ids if len(stop_ids) > 1 else stop_ids[0],
    }
    return tokenizer, tokenizer_config, generation_config


def _end_of_generation_ids(metadata: _Metadata, texts: list[str], types: list[int]) -> list[int]:
    """Every id that ends a generation, the end-of-turn token (else the EOS) first.

    Like llama.cpp, control tokens that are well-known turn ends count too: a chat model's template
    ends turns with one (SmolLM2: "<|im_end|>") while its pretraining data ends with another.
    """
    eot, eos, eom = (metadata.get(f"tokenizer.ggml.{key}_token_id", None) for key in ("eot", "eos", "eom"))
    controls = {
        text: index
        for index, (text, kind) in enumerate(zip(texts, types, strict=True))
        if kind == _TOKEN_CONTROL
    }
    known_ends = [controls[text] for text in _END_OF_TURN_TEXTS if text in controls]
    ordered = [index for index in (eot, eos, eom, *known_ends) if index is not None]
    if not ordered:
        raise GGUFConversionError("the GGUF file names no end-of-sequence token; it cannot be converted")
    return list(dict.fromkeys(ordered))


def _byte_level_bpe(
    texts: list[str], types: list[int], merges: list[str], pre: _PreTokenization, auto_bos: str | None
) -> Tokenizer:
    vocab = {text: index for index, text in enumerate(texts)}
    if len(vocab) != len(texts):
        raise GGUFConversionError("the GGUF vocabulary lists some token text twice; it cannot be converted")
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    splits: list[pre_tokenizers.PreTokenizer] = []
    if pre.digits_alone:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    splits.append(pre_tokenizers.Split(Regex(pre.split_regex), behavior="isolated"))
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tokenizer.decoder = decoders.ByteLevel()
    if auto_bos is None:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{auto_bos} $A",
            pair=f"{auto_bos} $A {auto_bos}:1 $B:1",
            special_tokens=[(auto_bos, vocab[auto_bos])],
        )
    special = [
        text for text, kind in zip(texts, types, strict=True) if kind in (_TOKEN_CONTROL, _TOKEN_UNKNOWN)
    ]
    user_defined = [text for text, kind in zip(texts, types, strict=True) if kind == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in special])
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False) for text in user_defined])
    return tokenizer


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
