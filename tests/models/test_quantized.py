"""Weight formats: the quantizers' round trips, the packed layers against their own dequantized
weights, every format's logits within its bound of float32, and GGUF files loaded directly."""

from __future__ import annotations

import pytest
import torch
from tiny import write_tiny_checkpoint

import engine
from engine import GREEDY
from models.quantized import GROUP, Int4Linear, Int8Linear, nbytes, quantize_int4, quantize_int8

IDS = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(0)).tolist()
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Largest and mean |logit - float32 logit| allowed, per (weight format, activations).
TINY_BOUNDS = {
    ("float16", "float32"): (0.01, 0.002),
    ("bfloat16", "float32"): (0.05, 0.01),
    ("int8", "float32"): (0.2, 0.03),
    ("int4", "float32"): (1.0, 0.2),
    ("int8", "bfloat16"): (0.25, 0.04),
    ("int4", "bfloat16"): (1.0, 0.2),
}
DEFAULT_MODEL_BOUNDS = {
    ("float16", "float32"): (0.1, 0.01),
    ("int8", "float32"): (3.0, 0.5),
    ("int4", "bfloat16"): (2.0, 0.3),
}


def test_values_on_the_grid_round_trip_exactly():
    scales = torch.tensor([0.5, 0.25])
    codes = torch.randint(-127, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    codes[:, 0] = 127  # the row's largest magnitude maps to 127
    back, found = quantize_int8(codes.float() * scales[:, None])
    assert torch.equal(back, codes.to(torch.int8)) and torch.allclose(found, scales)
    lows, steps = torch.randn(2, 2), torch.rand(2, 2) + 0.1
    grid = torch.randint(0, 16, (2, 2, GROUP), generator=torch.Generator().manual_seed(2))
    grid[..., 0], grid[..., 1] = 0, 15  # each group spans its full range, as a Q4_1 block does
    values = (grid * steps[..., None] + lows[..., None]).reshape(2, 2 * GROUP)
    codes4, scales4, lows4 = quantize_int4(values)
    assert torch.equal(codes4.reshape(grid.shape), grid.to(torch.int32))
    assert torch.allclose(scales4, steps) and torch.allclose(lows4, lows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_values_are_within_half_a_step(seed):
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(seed)) * 3
    codes, scales = quantize_int8(weight)
    assert ((codes.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-6).all()
    codes4, scales4, lows4 = quantize_int4(weight)
    back = codes4.reshape(96, -1, GROUP).float() * scales4[..., None] + lows4[..., None]
    assert (
        (back.reshape(96, 128) - weight).abs().reshape(96, -1, GROUP) <= scales4[..., None] / 2 + 1e-5
    ).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7])
def test_packed_layers_multiply_by_their_dequantized_weights(dtype, rows):
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, rows, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    codes, scales = quantize_int8(weight)
    int8 = Int8Linear.quantize(weight, (96,), dtype)
    expected = x.float() @ (codes.float() * scales[:, None]).T
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    assert (int8(x).float() - expected).abs().max() <= tolerance * expected.abs().max()
    codes4, scales4, lows4 = quantize_int4(weight)
    int4 = Int4Linear.quantize(weight, (96,), dtype)
    dequantized = (codes4.reshape(96, -1, GROUP).float() * scales4[..., None] + lows4[..., None]).reshape(
        96, 128
    )
    expected = x.float() @ dequantized.T
    assert (int4(x).float() - expected).abs().max() <= tolerance * expected.abs().max()
    assert int4(x).shape == (2, rows, 96) and int4(x).dtype == dtype


def test_int4_needs_whole_groups():
    with pytest.raises(ValueError, match="groups of 32"):
        quantize_int4(torch.randn(4, 40))


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tmp_path_factory):
    overrides = {"sliding_window": 20} if request.param == "mistral" else {}
    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param, **overrides)


@pytest.mark.parametrize(("form", "activations"), list(TINY_BOUNDS))
def test_every_weight_format_stays_within_its_bound(tiny, form, activations):
    reference = engine.load(tiny, backend="reference").logits(IDS)
    llm = engine.load(tiny, backend="reference", weight_dtype=form, dtype=activations)
    error = (llm.logits(IDS) - reference).abs()
    largest, mean = TINY_BOUNDS[form, activations]
    assert error.max() <= largest and error.mean() <= mean


def test_quantized_weights_take_a_quarter_or_less(tiny):
    full = nbytes(engine.load(tiny).model)
    assert nbytes(engine.load(tiny, weight_dtype="int8").model) <= 0.3 * full
    assert nbytes(engine.load(tiny, weight_dtype="int4").model) <= 0.3 * full


@pytest.mark.slow
@pytest.mark.parametrize(("form", "activations"), list(DEFAULT_MODEL_BOUNDS))
def test_default_model_formats_stay_within_bounds_and_answer_paris(form, activations):
    reference = engine.load()
    ids = reference.tokenizer.encode_chat(QUESTION)
    llm = engine.load(weight_dtype=form, dtype=activations)
    error = (llm.logits(ids) - reference.logits(ids)).abs()
    largest, mean = DEFAULT_MODEL_BOUNDS[form, activations]
    assert error.max() <= largest and error.mean() <= mean
    assert "Paris" in llm.chat(QUESTION, sampling=GREEDY, max_tokens=24).text


@pytest.mark.slow
def test_the_default_gguf_loads_directly_as_its_converted_checkpoint_does():
    from engine.default_model import default_gguf_path

    direct = engine.load(default_gguf_path())
    assert type(direct.model.model.layers[0].mlp.down_proj) is Int4Linear  # Q4_1 kept as 4-bit
    converted = engine.load(weight_dtype="int4")
    ids = converted.tokenizer.encode_chat(QUESTION)
    assert direct.tokenizer.encode_chat(QUESTION) == ids
    assert torch.equal(direct.logits(ids), converted.logits(ids))
    assert "Paris" in direct.chat(QUESTION, sampling=GREEDY, max_tokens=24).text
