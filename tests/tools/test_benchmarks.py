"""The benchmark and evaluation tools, end to end at tiny sizes, and their prompt and corpus builders."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import write_tiny_checkpoint

import schedules
from engine.config import ModelConfig, RopeConfig
from engine.gguf import convert
from engine.llm import LLM, load
from engine.prefill import PrefillConfig
from engine.tokenizer import load_tokenizer
from tools import bench_generate, bench_prefill, eval_passkey, eval_ppl, results
from tools.eval_passkey import INTRO, NEEDLE, QUESTION, filler_words, passkey_case, passkeys
from tools.eval_ppl import corpus_samples, last_chunk_nll, stdlib_sources
from tools.measure import DoesNotFit, Timing, memory_limit, repeated
from tools.prefill_specs import parse_specs
from tools.shapes import SHAPES, random_llm

TINY_SHAPE = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope=RopeConfig(theta=10000.0),
    max_position_embeddings=1024,
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def default_tokenizer(default_model_dir: Path):
    return load_tokenizer(default_model_dir)


def _outputs(tmp_path: Path, stem: str) -> tuple[Path, Path]:
    return tmp_path / f"{stem}.json", tmp_path / f"{stem}.png"


def _check_common(report: dict, png: Path, tool: str) -> None:
    assert report["tool"] == tool
    assert report["command"].startswith(f"python -m tools.{tool} ")
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["machine"]["torch"] == torch.__version__
    assert report["plot"] == png.name and png.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# shapes


def test_named_shapes_match_the_published_models() -> None:
    llama2 = SHAPES["llama2-7b"]
    assert (llama2.num_layers, llama2.hidden_size, llama2.num_heads, llama2.num_kv_heads) == (
        32,
        4096,
        32,
        32,
    )
    assert (llama2.head_dim, llama2.intermediate_size, llama2.vocab_size) == (128, 11008, 32000)
    assert llama2.rope.theta == 1e4 and llama2.max_position_embeddings == 4096
    assert SHAPES["llama3-8b"].num_kv_heads == 8
    smol = SHAPES["smollm2-135m"]
    assert (smol.num_layers, smol.hidden_size, smol.num_heads, smol.num_kv_heads) == (30, 576, 9, 3)


def test_random_llm_is_seeded_and_runs_a_compressed_prefill() -> None:
    first, second = random_llm(TINY_SHAPE, seed=3), random_llm(TINY_SHAPE, seed=3)
    assert first.tokenizer is None
    ids = list(range(1, 100))
    config = PrefillConfig(schedule="imdc", policy="snapkv", memory=16, chunk=32)
    logits = first.prefill(ids, config).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, second.prefill(ids, config).logits)
    assert not torch.equal(logits, random_llm(TINY_SHAPE, seed=4).prefill(ids, config).logits)


# ---------------------------------------------------------------------------------------------
# measuring


def test_repeated_warms_up_then_takes_the_median() -> None:
    seconds = iter([100.0, 3.0, 1.0, 2.0])  # the first (warm-up) call must not count
    calls = []

    def run() -> dict[str, Timing]:
        calls.append(1)
        value = next(seconds)
        return {"phase": Timing(value, int(value * 10), 5)}

    timing = repeated(run, 3)["phase"]
    assert len(calls) == 4
    assert timing == Timing(2.0, 30, 5)


def test_memory_limit_turns_a_failed_cpu_allocation_into_does_not_fit() -> None:
    before = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(DoesNotFit), memory_limit("cpu", 2**30):
        torch.empty(2**36, dtype=torch.uint8)  # 64 GiB of address space, past the 1 GiB allowed
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    with memory_limit("cpu", 2**30):
        assert torch.ones(1000).sum() == 1000


# ---------------------------------------------------------------------------------------------
# prefill configs on the command line


def test_config_specs_name_schedule_policy_memory_chunk_and_options() -> None:
    full, plain, sized, tuned = parse_specs(
        "full, imdc:snapkv:256 ,fixed:streaming:1024:512,im:snapkv:64:kernel=9", chunk=None, policy_args={}
    )
    assert (full.label, full.bounded, full.config) == ("full", False, PrefillConfig())
    assert plain.label == "imdc:snapkv:256:256" and plain.bounded
    assert (plain.config.schedule, plain.config.policy, plain.config.memory, plain.config.chunk) == (
        "imdc", "snapkv", 256, 256,
    )  # fmt: skip
    assert (sized.config.memory, sized.config.chunk) == (1024, 512)
    assert tuned.label == "im:snapkv:64:64:kernel=9" and tuned.config.policy_args == {"kernel": 9}
    in_bytes = parse_specs("fixed:mikv:64MiB:512")[0]
    assert in_bytes.label == "fixed:mikv:64MiB:512" and in_bytes.config.memory_bytes == 64 << 20
    assert in_bytes.config.chunk == 512
    default_chunk = parse_specs("fixed:snapkv:256", chunk=128, policy_args={"kernel": 3})[0].config
    assert default_chunk.chunk == 128 and default_chunk.policy_args == {"kernel": 3}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("imdc:snapkv", "is not 'full' or"),
        ("imdc:snapkv:many", "M must be whole tokens or a size like 64MiB"),
        ("imdc:snapkv:64MiB", "a memory given in bytes needs its chunk C"),
        ("imdc:snapkv:kernel=9:256", "is not 'full' or"),
        ("nope:snapkv:256", "unknown schedule 'nope'"),
        ("imdc:nope:256", "unknown policy 'nope'"),
        ("imdc:streaming:256:kernel=9", "has no option kernel"),
        ("full,full", "more than once"),
    ],
)
def test_config_specs_refuse_bad_input_clearly(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_specs(spec)


# ---------------------------------------------------------------------------------------------
# bench_prefill


def test_bench_prefill_measures_every_schedule(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(SHAPES, "tiny", TINY_SHAPE)
    json_path, png = _outputs(tmp_path, "prefill")
    argv = ["--shape", "tiny", "--length", "200", "--memory", "16,48", "--chunk", "32", "--repeat", "2"]
    assert bench_prefill.main([*argv, "--json", str(json_path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| source | schedule |" in out and "speed-up vs fixed" in out and "command: `python -m" in out

    report = json.loads(json_path.read_text())
    _check_common(report, png, "bench_prefill")
    rows = report["rows"]
    assert [(r["schedule"], r["memory"]) for r in rows] == [
        ("full", None), ("fixed", 16), ("im", 16), ("imdc", 16), ("fixed", 48), ("im", 48), ("imdc", 48),
    ]  # fmt: skip
    full = rows[0]
    for row in rows:
        assert row["fits"] and row["seconds"] > 0 and row["peak_bytes"] > 0
        assert row["peak_bytes"] >= row["added_bytes"] >= 0
        if row["memory"] is not None:
            fixed = next(r for r in rows if (r["schedule"], r["memory"]) == ("fixed", row["memory"]))
            assert row["speedup_vs_fixed"] == pytest.approx(fixed["seconds"] / row["seconds"])
            assert row["memory_vs_fixed"] == pytest.approx(row["peak_bytes"] / fixed["peak_bytes"])
        assert row["speedup_vs_full"] == pytest.approx(full["seconds"] / row["seconds"])
        config = PrefillConfig(schedule=row["schedule"], memory=row["memory"] or 0, chunk=32)
        plan = config.plan(200)
        assert row["steps"] == len(plan) and row["peak_span"] == schedules.peak_span(plan)
    assert report["paper"] == []  # the settings are not the paper's


def test_bench_prefill_reports_a_run_that_does_not_fit(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(SHAPES, "tiny", TINY_SHAPE)
    prefill = LLM.prefill

    def full_runs_out(self, ids, config=None, **options):
        if config is not None and config.schedule == "full":
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return prefill(self, ids, config, **options)

    monkeypatch.setattr(LLM, "prefill", full_runs_out)
    json_path, _ = _outputs(tmp_path, "prefill")
    argv = ["--shape", "tiny", "--length", "96", "--memory", "16", "--chunk", "32", "--json", str(json_path)]
    assert bench_prefill.main(argv) == 0
    assert "does not fit" in capsys.readouterr().out
    full, *others = json.loads(json_path.read_text())["rows"]
    assert not full["fits"] and "simulated" in full["error"]
    assert all(row["fits"] and row["speedup_vs_full"] is None for row in others)


def test_bench_prefill_puts_the_paper_cell_beside_matching_settings(
    monkeypatch, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    # The paper's cell needs the LLaMA-2-7B shape at 32k; pretend the tiny run is that setting.
    setting = {"shape": "checkpoint", "length": 2048, "chunk": 1024, "policy": "snapkv"}
    monkeypatch.setattr(bench_prefill, "PAPER_SETTING", setting)
    json_path, _ = _outputs(tmp_path, "prefill")
    argv = ["--model", str(tiny_checkpoint), "--length", "2048", "--memory", "256,1024", "--chunk", "1024"]
    assert bench_prefill.main([*argv, "--schedules", "fixed,imdc", "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "paper (A800, eager)" in out and "15.1" in out and "37.7 GB" in out
    report = json.loads(json_path.read_text())
    paper = {(p["schedule"], p["memory"]): p for p in report["paper"]}
    assert set(paper) == {("fixed", 256), ("imdc", 256), ("fixed", 1024), ("imdc", 1024)}
    assert paper["imdc", 1024]["speedup_vs_fixed"] == pytest.approx(15.074 / 10.050)
    assert any("measured" in note and "differently" in note for note in report["notes"])


def test_bench_prefill_rejects_bad_input_with_one_line(capsys) -> None:
    assert bench_prefill.main(["--schedules", "fixed,nonsense", "--shape", "smollm2-135m"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: unknown schedule 'nonsense'") and error.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# eval_passkey


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    length=st.integers(200, 6000),
    depth=st.floats(0.0, 1.0),
    filler=st.sampled_from(["repeat", "prose"]),
)
def test_passkey_prompt_has_the_length_needle_and_question(default_tokenizer, length, depth, filler) -> None:
    key = "40917"
    case = passkey_case(default_tokenizer, length, depth, key, filler=filler)
    assert abs(len(case.ids) - length) <= 0.02 * length
    assert case.key == key
    text = default_tokenizer.decode(case.ids, skip_special=False)
    needle = NEEDLE.format(key=key)
    assert text.count(needle.strip()) == 1 and text.count(key) == 2
    # The needle starts a sentence, at the sentence start nearest to the requested depth.
    end = text.index(QUESTION)
    haystack = text[text.index(INTRO) + len(INTRO) : end]
    at = haystack.index(needle.strip())
    assert at == 0 or haystack[at - 1] in " \n"
    before, total = len(haystack[:at].split()), len(haystack.split()) - len(needle.split())
    assert abs(before - depth * total) <= _longest_sentence(filler)
    # The question and the template's tail are exactly the last question_tokens tokens.
    tail = default_tokenizer.decode(case.ids[-case.question_tokens :], skip_special=False)
    assert tail == text[end:] and tail.startswith(QUESTION)


def _longest_sentence(filler: str) -> int:
    """The most words between two sentence starts of ``filler``."""
    ends = [index for index, (_, last) in enumerate(filler_words(filler)) if last]
    return max(later - earlier for earlier, later in zip([-1, *ends], ends, strict=False))


def test_passkey_prompt_refuses_impossible_requests(default_tokenizer) -> None:
    with pytest.raises(ValueError, match="at least"):
        passkey_case(default_tokenizer, 40, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        passkey_case(default_tokenizer, 1000, 1.5, "12345")
    with pytest.raises(ValueError, match="filler"):
        passkey_case(default_tokenizer, 1000, 0.5, "12345", filler="lorem")


def test_passkeys_are_seeded_distinct_five_digit_numbers() -> None:
    keys = passkeys(0, 1500, 0.5, 5)
    assert keys == passkeys(0, 1500, 0.5, 5) != passkeys(1, 1500, 0.5, 5)
    assert len(set(keys)) == 5 and all(len(key) == 5 and key.isdigit() for key in keys)


def test_eval_passkey_end_to_end(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    json_path, png = _outputs(tmp_path, "passkey")
    argv = ["--model", str(tiny_checkpoint), "--lengths", "400,520", "--depths", "0.2,0.8", "--keys", "2"]
    argv += ["--configs", "full,imdc:snapkv:64:kernel=3", "--query-aware", "--max-tokens", "3"]
    assert eval_passkey.main([*argv, "--json", str(json_path), "--plot", str(png)]) == 0
    assert "Pass-key hits by prompt length" in capsys.readouterr().out
    report = json.loads(json_path.read_text())
    _check_common(report, png, "eval_passkey")
    records = report["records"]
    assert len(records) == 2 * 2 * 2 * 2
    for record in records:
        assert record["hit"] == (record["key"] in record["answer"])
        assert abs(record["prompt_tokens"] - record["length"]) <= 0.02 * record["length"]
        assert record["prefill_seconds"] > 0 and record["peak_bytes"] > 0
    accuracy, by_depth, cost = eval_passkey.tables(report)
    for row, config in zip(accuracy.rows, ["full", "imdc:snapkv:64:64:kernel=3"], strict=True):
        mine = [r for r in records if r["config"] == config]
        hits = [f"{sum(r['hit'] for r in mine if r['length'] == n)}/4" for n in (400, 520)]
        assert row == [config, "no" if config == "full" else "yes", *hits, f"{sum(r['hit'] for r in mine)}/8"]
    assert (
        [row[0] for row in by_depth.rows]
        == [row[0] for row in cost.rows]
        == [row[0] for row in accuracy.rows]
    )


# ---------------------------------------------------------------------------------------------
# eval_ppl


def test_stdlib_corpus_is_deterministic_and_long_enough(monkeypatch, default_tokenizer) -> None:
    files = stdlib_sources()
    assert files and all(path.suffix == ".py" for path in files)
    assert not any({"test", "site-packages"} & set(path.parts) for path in files[:200])
    samples = corpus_samples(default_tokenizer, 3000, 3)
    assert len(samples) == 3 and all(len(sample) >= 3000 for sample in samples)
    assert samples == corpus_samples(default_tokenizer, 3000, 3)
    first = files[0].read_text(encoding="utf-8")
    assert default_tokenizer.decode(samples[0]).startswith(first[:200])
    monkeypatch.setattr(eval_ppl, "stdlib_sources", lambda: files[:3])
    with pytest.raises(ValueError, match="fewer samples"):
        corpus_samples(default_tokenizer, 10**6, 1)


def test_full_last_chunk_nll_matches_plain_logits(tiny_checkpoint: Path) -> None:
    llm = load(tiny_checkpoint)
    ids = corpus_samples(llm.tokenizer, 120, 1)[0][:120]
    expected = F.cross_entropy(llm.logits(ids)[-33:-1], torch.tensor(ids[-32:]), reduction="sum")
    assert last_chunk_nll(llm, ids, PrefillConfig(), 32) == pytest.approx(float(expected), rel=1e-4)
    compressed = PrefillConfig(schedule="fixed", policy="streaming", memory=8, chunk=16)
    assert last_chunk_nll(llm, ids, compressed, 32) != pytest.approx(float(expected), rel=1e-4)


def test_eval_ppl_end_to_end(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    json_path, png = _outputs(tmp_path, "ppl")
    argv = ["--model", str(tiny_checkpoint), "--length", "160", "--samples", "2", "--chunk", "32"]
    argv += ["--configs", "full,fixed:snapkv:32,imdc:streaming:16"]
    assert eval_ppl.main([*argv, "--json", str(json_path), "--plot", str(png)]) == 0
    assert "Perplexity of the last 32 of L=160 tokens" in capsys.readouterr().out
    report = json.loads(json_path.read_text())
    _check_common(report, png, "eval_ppl")
    rows = {row["config"]: row for row in report["rows"]}
    assert list(rows) == ["full", "fixed:snapkv:32:32", "imdc:streaming:16:32"]
    for row in rows.values():
        assert row["ppl"] > 1 and len(row["sample_ppl"]) == 2
        assert row["ppl_vs_full"] == pytest.approx(row["ppl"] / rows["full"]["ppl"])
        # The overall perplexity is the geometric mean of the samples' (equal token counts).
        assert math.log(row["ppl"]) == pytest.approx(sum(math.log(p) for p in row["sample_ppl"]) / 2)


# ---------------------------------------------------------------------------------------------
# bench_generate


def test_bench_generate_against_transformers_and_llama_cpp(tiny_gguf, tmp_path: Path, capsys) -> None:
    pytest.importorskip("llama_cpp")
    gguf = tiny_gguf().path
    model = convert(gguf, tmp_path / "model", progress=False)
    json_path, png = _outputs(tmp_path, "generate")
    argv = ["--model", str(model), "--gguf", str(gguf), "--lengths", "32,96", "--decode-tokens", "3"]
    argv += ["--configs", "full,imdc:snapkv:16", "--threads", "2"]
    assert bench_generate.main([*argv, "--json", str(json_path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Decode tokens/s by prompt length" in out and "×cpp 1.00)" in out
    report = json.loads(json_path.read_text())
    _check_common(report, png, "bench_generate")
    engines = report["settings"]["engines"]
    formats = len(report["settings"]["formats"])  # each with both configs, then the two peers
    assert len(engines) == 2 * formats + 2 and engines[-2:] == ["transformers fp32", engines[-1]]
    assert engines[-1].startswith("llama.cpp")
    rows = report["rows"]
    assert len(rows) == 2 * len(engines)
    for row in rows:
        peer = next(r for r in rows if r["engine"] == "transformers fp32" and r["length"] == row["length"])
        assert row["prefill_tok_s"] == pytest.approx(row["length"] / row["prefill_seconds"])
        assert row["decode_tok_s"] == pytest.approx(3 / row["decode_seconds"])
        assert row["decode_vs_transformers"] == pytest.approx(row["decode_tok_s"] / peer["decode_tok_s"])
        assert len(row["tokens"]) == 3
    exact = [r for r in rows if r["engine"] == "ours fp32 full"]
    assert all(r["agrees_with_transformers"] == 3 for r in exact)  # same weights, same math, greedy


def test_bench_generate_measures_every_weight_format(tiny_gguf, tmp_path: Path, capsys) -> None:
    gguf = tiny_gguf().path
    model = convert(gguf, tmp_path / "model", progress=False)
    json_path, png = _outputs(tmp_path, "formats")
    argv = ["--model", str(model), "--gguf", str(gguf), "--lengths", "32", "--decode-tokens", "3"]
    argv += [
        "--configs",
        "full",
        "--engines",
        "ours,transformers",
        "--weight-dtypes",
        "float32,int8,int4,gguf",
    ]
    assert bench_generate.main([*argv, "--json", str(json_path), "--plot", str(png)]) == 0
    assert "Weight formats: bytes, resident memory" in capsys.readouterr().out
    report = json.loads(json_path.read_text())
    weights = {w["format"]: w for w in report["weights"]}
    assert list(weights) == ["float32", "int8", "int4", "gguf"]
    assert weights["float32"]["max_logit_error"] == 0.0
    assert (
        weights["int4"]["weights_bytes"]
        < weights["int8"]["weights_bytes"]
        < 0.5 * weights["float32"]["weights_bytes"]
    )
    rows = {row["engine"]: row for row in report["rows"]}
    assert (
        rows["ours fp32 full"]["agrees_with_float32"] == 3
        and rows["ours fp32 full"]["agrees_with_transformers"] == 3
    )
    assert all(0 <= row["agrees_with_float32"] <= 3 for name, row in rows.items() if name.startswith("ours"))
    for profile in report["profiles"]:  # the parts of a decode step add up to the step
        parts = profile["weights"] + profile["attention"] + profile["other"]
        assert (
            profile["weights"] > 0
            and profile["attention"] > 0
            and parts == pytest.approx(profile["ms_per_token"])
        )


def test_bench_generate_skips_missing_peers_with_a_note(monkeypatch, tiny_checkpoint: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    argv = ["--model", str(tiny_checkpoint), "--gguf", str(tiny_checkpoint / "config.json")]
    argv += ["--lengths", "24", "--decode-tokens", "2", "--configs", "full", "--weight-dtypes", "float32"]
    assert bench_generate.main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped transformers: not installed" in out and "skipped llama_cpp: not installed" in out
    assert "llama.cpp runs" not in out
    assert "| ours fp32 full | " in out


# ---------------------------------------------------------------------------------------------
# results


def test_results_renders_every_report_and_marks_smoke_runs(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(SHAPES, "tiny", TINY_SHAPE)
    docs = tmp_path / "docs"
    json_path, png = _outputs(docs, "bench_prefill_cpu_snapkv")
    argv = [
        "--shape",
        "tiny",
        "--length",
        "64",
        "--memory",
        "16",
        "--chunk",
        "16",
        "--schedules",
        "full,imdc",
    ]
    assert bench_prefill.main([*argv, "--json", str(json_path), "--plot", str(png)]) == 0
    readme = tmp_path / "README.md"  # never the project's own
    readme.write_text(f"{results.README_START}\n{results.README_END}\n")
    assert results.main(["--docs", str(docs), "--readme", str(readme)]) == 0
    page = (docs / "RESULTS.md").read_text()
    section = page.split("## Prefill schedules on the CPU, SnapKV (default model)")[1].split("\n## ")[0]
    assert "Smoke run" in section and "| source | schedule |" in section
    assert "![bench_prefill](bench_prefill_cpu_snapkv.png)" in section
    assert "Not measured yet" in page and "## The papers' numbers" in page and "15.1" in page
    for run in results.RUNS:
        assert run.command in page
    assert "No full measurement yet" in readme.read_text()

    # A report made by exactly the full-run command is not a smoke run.
    report = json.loads(json_path.read_text())
    report["argv"] = results.RUNS[0].argv
    json_path.write_text(json.dumps(report))
    page_args = ["--docs", str(docs), "--readme", str(readme), "--output", str(tmp_path / "page.md")]
    assert results.main(page_args) == 0
    section = (tmp_path / "page.md").read_text().split("SnapKV (default model)")[1].split("\n## ")[0]
    assert "Smoke run" not in section
    # A full run reaches the README; a smoke run does not.
    assert "| source | schedule |" in readme.read_text()
    assert "Partial run" not in section and "partial run" not in readme.read_text()

    # A resumable run stopped before its last case says so, on the page and in the README.
    json_path.write_text(json.dumps({**report, "complete": False}))
    assert results.main(page_args) == 0
    section = (tmp_path / "page.md").read_text().split("SnapKV (default model)")[1].split("\n## ")[0]
    assert "Partial run" in section and "partial run" in readme.read_text()


def test_results_refresh_only_the_readme_block(tmp_path):
    from tools.results import README_END, README_START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{README_START}\nold numbers\n{README_END}\n\noutro\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    assert update_readme(readme, docs)
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n") and "old numbers" not in text
    assert "No full measurement yet" in text
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers")
    assert not update_readme(plain, docs) and plain.read_text() == "no markers"
