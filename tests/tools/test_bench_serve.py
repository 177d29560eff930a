"""tools.bench_serve end to end at a tiny size: both scenarios measured, the reuse visible."""

from __future__ import annotations

import json

from tiny import write_tiny_checkpoint

from tools import bench_serve


def test_bench_serve_measures_concurrency_and_reuse(tmp_path, capsys):
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", max_position_embeddings=4096)
    json_path, png = tmp_path / "serve.json", tmp_path / "serve.png"
    argv = ["-m", str(checkpoint), "--clients", "1,3", "--tokens", "3", "--document", "700", "--turns", "2"]
    argv += ["--json", str(json_path), "--plot", str(png), "--config", "imdc:streaming:128"]
    assert bench_serve.main(argv) == 0
    assert "Concurrent clients" in capsys.readouterr().out and png.stat().st_size > 0
    report = json.loads(json_path.read_text())
    assert [row["clients"] for row in report["concurrency"]] == [1, 3]
    assert all(row["tokens"] > 0 and row["ttft_mean"] > 0 for row in report["concurrency"])
    warm, cold = report["reuse"], report["no_reuse"]
    assert warm[0]["stats"]["reused_tokens"] == 0 and warm[1]["stats"]["reused_tokens"] > 600
    assert all(turn["stats"]["reused_tokens"] == 0 for turn in cold)
    assert cold[1]["stats"]["prefilled_tokens"] > warm[1]["stats"]["prefilled_tokens"]
