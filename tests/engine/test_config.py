import json

import pytest

import models
from engine.config import ConfigError, load_config, parse_config

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def parse(**fields):
    return parse_config({**BASE, **fields}, architectures=models.available())


def test_defaults_and_derived_fields():
    config = parse()
    assert (config.num_kv_heads, config.head_dim, config.group) == (4, 16, 1)
    assert config.rope.kind == "default" and config.rope.theta == 10000.0
    assert not config.tie_word_embeddings and config.sliding_window is None


def test_gqa_head_dim_and_tied_embeddings():
    config = parse(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)
    assert (config.num_kv_heads, config.head_dim, config.group, config.tie_word_embeddings) == (
        2,
        24,
        2,
        True,
    )


def test_rope_scaling_layouts():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}  # fmt: skip
    old = parse(rope_theta=500000.0, rope_scaling=llama3).rope
    new = parse(rope_parameters={**llama3, "rope_theta": 500000.0}).rope
    assert old == new and old.kind == "llama3" and old.theta == 500000.0 and old.factor == 8.0
    linear = parse(rope_scaling={"type": "linear", "factor": 2.0}).rope
    assert (linear.kind, linear.factor) == ("linear", 2.0)
    assert parse(rope_parameters={"rope_type": "default", "rope_theta": 1e5}).rope.theta == 1e5


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unknown_rope_type_is_refused(kind):
    with pytest.raises(ConfigError, match=f"unsupported rope type '{kind}'"):
        parse(rope_scaling={"rope_type": kind, "factor": 2.0})


def test_unknown_architecture_is_refused_with_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"unsupported architecture GPT2LMHeadModel; supported: .*LlamaForCausalLM"
    ):
        parse(architectures=["GPT2LMHeadModel"])


def test_mistral_sliding_window_and_eos_lists(tmp_path):
    raw = {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096, "eos_token_id": [2, 7]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    config = load_config(tmp_path, models.available())
    assert config.architecture == "MistralForCausalLM" and config.sliding_window == 4096
    assert config.eos_token_ids == (2, 7, 9)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"vocab_size": None}, "malformed field"),
    ],
)
def test_unsupported_options_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        parse(**fields)


def test_missing_field_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"needs config\.json"):
        load_config(tmp_path, models.available())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(tmp_path, models.available())
    raw = dict(BASE)
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="lacks the required field 'hidden_size'"):
        parse_config(raw, architectures=models.available())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vocab_size": -5}, "vocab_size must be a positive integer, got -5"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"head_dim": 15}, "head_dim 15 is odd"),
        ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be positive"),
        ({"sliding_window": 0}, "sliding_window must be a positive number of tokens"),
        ({"hidden_size": "wide"}, "malformed field"),
    ],
)
def test_impossible_sizes_are_refused_clearly(fields, message):
    with pytest.raises(ConfigError, match=message):
        parse(**fields)
