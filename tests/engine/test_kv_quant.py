"""A quantized memory (``kv_bits``): codes and their error, MiKV's key balancer, the memory's bookkeeping
and bytes, and the engine end to end."""

from dataclasses import replace

import pytest
import torch
from tiny import write_calibration, write_tiny_checkpoint

import engine
import policies
from engine import GREEDY, PrefillConfig
from engine.cache import KVMemory, LayerMemory
from engine.chat import main
from engine.cli import parse_size
from engine.config import RopeConfig
from engine.kv_quant import BITS, KVCodec, key_balancer
from models.rope import Rope
from tools.prefill_specs import parse_specs

DIM = 16


@pytest.mark.parametrize("bits", BITS)
def test_values_on_the_grid_round_trip_exactly(bits):
    codec = KVCodec(bits, DIM)
    scale = torch.tensor([0.125, 0.5, 3.0])
    zero = torch.tensor([-1.0, 0.25, -40.0])
    codes = torch.randint(0, 2**bits, (3, DIM), generator=torch.Generator().manual_seed(bits))
    codes[:, 0], codes[:, 1] = 0, 2**bits - 1  # the row's min and max are on the grid's ends
    rows = codes.float() * scale[:, None] + zero[:, None]
    packed, params = codec.encode(rows)
    assert packed.dtype == torch.uint8 and packed.shape == (3, DIM * bits // 8)
    assert torch.equal(codec.decode(packed, params), rows)


@pytest.mark.parametrize("bits", BITS)
def test_random_values_are_within_half_a_step(bits):
    codec = KVCodec(bits, DIM)
    rows = torch.randn(200, DIM, generator=torch.Generator().manual_seed(0)) * 3
    rows[7] = 0.5  # a constant row has no step: it must come back as it is
    packed, params = codec.encode(rows)
    error = (codec.decode(packed, params) - rows).abs().amax(dim=-1)
    step = (rows.amax(dim=-1) - rows.amin(dim=-1)) / (2**bits - 1)
    assert (error <= step / 2 + 1e-3 * rows.abs().amax(dim=-1)).all()  # float16 scale and zero
    assert error[7] == 0


def test_bytes_of_a_vector_are_its_codes_scale_and_zero():
    assert [KVCodec(bits, 64).vector_bytes for bits in (8, 4, 3, 2)] == [68, 36, 28, 20]


def test_the_balancer_keeps_attention_logits_and_commutes_with_rope():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 9, DIM, generator=generator)
    k = torch.randn(1, 2, 9, DIM, generator=generator)
    k[..., 3] *= 20  # an outlier channel
    balance = key_balancer(q, k)  # [B, Hkv, D]
    assert balance.shape == (1, 2, DIM) and (balance > 0).all()
    half = DIM // 2
    assert torch.equal(balance[..., :half], balance[..., half:])  # tied across rotary pairs
    grouped = balance.repeat_interleave(2, dim=1)[:, :, None]
    assert torch.allclose((q / grouped) @ (k.repeat_interleave(2, dim=1) * grouped).mT,
                          q @ k.repeat_interleave(2, dim=1).mT, atol=1e-4)  # fmt: skip
    rope = Rope(DIM, RopeConfig(theta=10000.0))
    positions = torch.arange(9)
    scaled = balance[:, :, None]
    assert torch.allclose(rope.rotate(k * scaled, positions), rope.rotate(k, positions) * scaled, atol=1e-4)
    assert balance[..., 3].max() < 1  # the outlier channel is shrunk before quantizing


@pytest.mark.parametrize("bits", [8, 4])
def test_the_memory_keeps_drops_and_repacks_quantized_entries(bits):
    generator = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, 1, 3, 12, DIM, generator=generator)
    queries = torch.randn(1, 6, 12, DIM, generator=generator)
    layer = LayerMemory(1, 3, DIM, torch.float32, torch.device("cpu"), KVCodec(bits, DIM))
    plain = LayerMemory(1, 3, DIM, torch.float32, torch.device("cpu"))
    for memory in (layer, plain):
        memory.append(keys, keys, values, torch.arange(12), queries)
    bound = 0.1 if bits == 8 else 1.5
    assert (layer.keys - keys).abs().max() < bound and (layer.values - values).abs().max() < bound

    for memory in (layer, plain):
        memory.keep(torch.tensor([[[0, 2, 5, 9]] * 3]))  # the same entries in every head
        memory.keep([torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([0, 1, 2, 3])])  # ragged
        memory.append(keys[:, :, :2], keys[:, :, :2], values[:, :, :2], torch.arange(12, 14))
    assert layer.lengths == plain.lengths == [4, 3, 6]
    for segment in range(3):
        assert torch.equal(layer.segment(segment, "positions"), plain.segment(segment, "positions"))
        for kind in ("keys", "rotated", "values"):
            difference = layer.segment(segment, kind) - plain.segment(segment, kind)
            assert difference.abs().max() < bound

    layer.trim()
    assert layer.entry_bytes() == 3 * KVCodec(bits, DIM).vector_bytes + 8
    assert layer.nbytes == sum(layer.lengths) * layer.entry_bytes()


def test_a_memory_of_4_bits_takes_the_bytes_it_says():
    memory = KVMemory(2, 3, 64, kv_bits=4)
    assert memory.bytes_per_token() == 2 * 3 * (3 * 36 + 8)
    assert memory.bytes_per_token() * 6 < KVMemory(2, 3, 64).bytes_per_token()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return engine.load(write_tiny_checkpoint(tmp_path_factory.mktemp("quant") / "ckpt", "llama"))


IDS = torch.randint(3, 320, (70,), generator=torch.Generator().manual_seed(3)).tolist()


def test_an_8_bit_memory_gives_nearly_the_logits_of_a_plain_one(llm):
    plain = llm.prefill(IDS, PrefillConfig()).logits[0]
    assert (llm.prefill(IDS, PrefillConfig(kv_bits=8)).logits[0] - plain).abs().max() < 0.05
    compressing = PrefillConfig(policy="snapkv", memory=24, chunk=16)
    plain_run = llm.prefill(IDS, compressing)
    quantized_run = llm.prefill(IDS, PrefillConfig(policy="snapkv", memory=24, chunk=16, kv_bits=8))
    assert (quantized_run.logits - plain_run.logits).abs().max() < 0.05
    dim = llm.config.head_dim  # an entry: pre-RoPE key, rotated key and value, then its position
    ratio = (3 * (dim + 4) + 8) / (3 * 4 * dim + 8)
    assert quantized_run.memory.held_bytes() == pytest.approx(plain_run.memory.held_bytes() * ratio)
    answers = [
        llm.complete(run, IDS, sampling=GREEDY, max_tokens=5).token_ids for run in (plain_run, quantized_run)
    ]
    assert answers[0] == answers[1]


def test_a_quantized_memory_is_saved_and_loaded_whole(llm):
    first = llm.prefill(IDS, PrefillConfig(policy="h2o", memory=24, chunk=16, kv_bits=4)).memory
    again = llm.new_memory(PrefillConfig(kv_bits=4))
    again.load_tensors(first.tensors(), seen=first.seen)
    for before, after in zip(first.layers, again.layers, strict=True):
        assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)
        assert after.nbytes == before.nbytes


def test_kv_bits_are_checked_everywhere(tiny_dir, capsys):
    with pytest.raises(ValueError, match="kv_bits must be one of 2, 3, 4, 8, got 5"):
        PrefillConfig(kv_bits=5)
    assert main(["-m", str(tiny_dir), "-p", "hi", "-n", "1", "--kv-bits", "16"]) == 2
    err = capsys.readouterr().err
    assert "kv_bits must be one of 2, 3, 4, 8, got 16" in err and "Traceback" not in err
    full, compressed = parse_specs("full:kv_bits=4,imdc:snapkv:64:kv_bits=2")
    assert (full.label, full.bounded, full.config.kv_bits) == ("full:kv_bits=4", False, 4)
    assert compressed.config.kv_bits == 2 and compressed.config.policy_args == {}
    with pytest.raises(ValueError, match=r"^config 'full:kernel=9': full attention takes only kv_bits"):
        parse_specs("full:kernel=9")


@pytest.fixture(scope="module")
def tiny_dir(llm):
    return llm.path


@pytest.mark.parametrize(
    "policy",
    [name for name in policies.available() if name != "none" and policies.get(name).low_bits is None],
)
def test_every_policy_runs_on_a_quantized_memory_and_keeps_what_it_keeps_on_a_plain_one(llm, policy):
    """Scores come from dequantized keys, so a selection (and a head-wise split of the budget) may
    differ; the bookkeeping may not: every layer holds as many entries as on a plain memory, and
    8-bit answers stay close."""
    write_calibration(llm)
    plain = llm.prefill(IDS, PrefillConfig(policy=policy, memory=24, chunk=16))
    quantized = llm.prefill(IDS, PrefillConfig(policy=policy, memory=24, chunk=16, kv_bits=8))
    for before, after in zip(plain.memory.layers, quantized.memory.layers, strict=True):
        assert sum(before.lengths) == sum(after.lengths)
    assert (quantized.logits - plain.logits).abs().max() < 0.5


@pytest.mark.parametrize(
    ("text", "size"), [("64MiB", 64 << 20), ("1.5GB", 1_500_000_000), ("1000", 1000), ("2kib", 2048)]
)
def test_sizes_read_as_people_write_them(text, size):
    assert parse_size(text) == size


def test_a_budget_in_bytes_becomes_the_tokens_that_fit(llm):
    per_token = llm.new_memory().bytes_per_token(0)  # snapkv keeps no state per token
    config = PrefillConfig(policy="snapkv", chunk=16, memory_bytes=(4 + 20) * per_token + per_token // 2)
    assert llm.sized(config).memory == 20
    result = llm.prefill(IDS, config)
    assert result.memory.held_bytes() <= config.memory_bytes
    quantized = llm.sized(replace(config, kv_bits=4))
    assert quantized.memory > 4 * 20  # the same bytes hold several times more 4-bit tokens


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "snapkv", "--memory-bytes", "100"], "a memory of 100 bytes holds 0 tokens of this"),
        (["--policy", "snapkv", "--memory", "64", "--memory-bytes", "1MiB"], "both set the memory budget"),
        (["--memory-bytes", "1MiB"], "--memory-bytes sets a compression budget, but no --policy"),
        (["--policy", "snapkv", "--memory-bytes", "lots"], "'lots' is not a size like 64MiB"),
    ],
)
def test_bad_byte_budgets_are_one_clear_line(tiny_dir, capsys, argv, message):
    try:
        status = main(["-m", str(tiny_dir), "-p", "hi", "-n", "1", *argv])
    except SystemExit as exit:  # argparse's own refusal of the flag's value
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
