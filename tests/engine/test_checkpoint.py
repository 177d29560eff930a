import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import write_tiny_checkpoint

from engine.checkpoint import CheckpointError, load_model, parameter_places


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def state(directory):
    return {
        name: tensor for path in directory.glob("*.safetensors") for name, tensor in load_file(path).items()
    }


def test_every_tensor_lands_in_its_place(tiny):
    _, model = load_model(tiny)
    expected = state(tiny)
    layer = "model.layers.1"
    fused = {
        f"{layer}.self_attn.qkv_proj.weight": [f"{layer}.self_attn.{p}_proj.weight" for p in "qkv"],
        f"{layer}.mlp.gate_up_proj.weight": [f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"],
    }
    loaded = dict(model.named_parameters())
    for name, parts in fused.items():
        assert torch.equal(loaded[name], torch.cat([expected[part] for part in parts]))
    for name in ("model.embed_tokens.weight", "lm_head.weight", f"{layer}.self_attn.o_proj.weight"):
        assert torch.equal(loaded[name], expected[name])
    assert len(parameter_places(model)) == len(expected)


def test_sharded_checkpoint_equals_single_file(tiny, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(
        list(sharded.glob("*.safetensors"))
    ) > 1
    _, single = load_model(tiny)
    _, shards = load_model(sharded)
    for (name, a), (_, b) in zip(single.named_parameters(), shards.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_dtype_is_the_callers_choice(tiny):
    _, model = load_model(tiny, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _, model = load_model(tiny)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_tied_embeddings_share_one_tensor(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in state(directory)
    _, model = load_model(directory)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def copy_with(tiny, target, tensors):
    target.mkdir()
    (target / "config.json").write_text((tiny / "config.json").read_text())
    save_file(tensors, target / "model.safetensors")
    return target


def test_missing_unexpected_and_misshapen_tensors_are_named(tiny, tmp_path):
    tensors = state(tiny)
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.norm\.weight"):
        load_model(copy_with(tiny, tmp_path / "missing", missing))
    with pytest.raises(CheckpointError, match=r"tensors the model does not use: extra\.weight"):
        load_model(copy_with(tiny, tmp_path / "extra", {**tensors, "extra.weight": torch.zeros(2)}))
    misshapen = {**tensors, "model.norm.weight": torch.zeros(3)}
    with pytest.raises(
        CheckpointError, match=r"model.norm.weight has shape \(3,\), the config implies \(64,\)"
    ):
        load_model(copy_with(tiny, tmp_path / "shape", misshapen))


def test_pickled_weights_are_never_loaded(tiny, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text((tiny / "config.json").read_text())
    (directory / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(
        CheckpointError, match=r"only pickle-based weights \(pytorch_model.bin\), which are never"
    ):
        load_model(directory)


def test_truncated_and_corrupt_files_give_a_clear_error(tiny, tmp_path):
    directory = copy_with(tiny, tmp_path / "truncated", state(tiny))
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(directory)
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(directory)


def test_missing_directory_and_shards(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    directory = copy_with(tiny, tmp_path / "index", state(tiny))
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"names shards that are missing: model-00002-of-00002\.safetensors"
    ):
        load_model(directory)
