"""tools.find_heads: a well-formed calibration file for any checkpoint, stable head scores on the
default model."""

import argparse
import json

import pytest
import torch
from tiny import write_tiny_checkpoint

import engine
import policies
from tools import find_heads
from tools.calibrate import razor


def test_a_tiny_checkpoint_gets_every_section_in_the_right_shapes(tmp_path, capsys):
    directory = write_tiny_checkpoint(tmp_path / "tiny")
    argv = ["-m", str(directory), "--length", "600", "--samples", "1", "--duo-samples", "2",
            "--compresskv-samples", "2", "--compresskv-budget", "64", "--pod-samples", "1",
            "--pod-recent", "256"]  # fmt: skip
    assert find_heads.main(argv) == 0
    data = json.loads((directory / "calibration.json").read_text())
    layers, kv_heads, heads = 2, 2, 4
    assert set(data) == {"format", "model", "reform", "razor", "duo", "compresskv", "pod"}
    similarity = torch.tensor(data["pod"]["similarity"])
    assert similarity.shape == (kv_heads, layers, layers) and torch.equal(
        similarity, similarity.transpose(1, 2)
    )
    assert ((similarity >= 0) & (similarity <= 1)).all() and (similarity.diagonal(dim1=1, dim2=2) == 1).all()
    for section, name, width in [
        ("razor", "induction", kv_heads), ("razor", "echo", kv_heads), ("duo", "proxy", kv_heads),
        ("compresskv", "retrieval", heads),
    ]:  # fmt: skip
        table = torch.tensor(data[section][name])
        assert table.shape == (layers, width) and torch.isfinite(table).all() and (table >= 0).all()
    assert len(data["compresskv"]["layer_error"]) == layers
    assert all(section["command"].startswith("python -m tools.find_heads") for section in data.values()
               if isinstance(section, dict) and "command" in section)  # fmt: skip
    llm = engine.load(directory, backend="reference")
    for name in ("razor", "duo", "compresskv"):  # every calibrated policy reads it
        policies.get(name).prepare(llm.model_facts())
    out = capsys.readouterr().out
    assert "RazorAttention" in out and f"wrote {directory / 'calibration.json'}" in out

    # Remaking one section keeps the others.
    reform = data["reform"]
    assert find_heads.main(["-m", str(directory), "--methods", "duo", "--duo-samples", "1"]) == 0
    again = json.loads((directory / "calibration.json").read_text())
    assert again["reform"] == reform and again["duo"]["samples"] == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--methods", "oracle"],
        ["--duo-samples", "0"],
        ["--razor-length", "1"],
        ["--methods", "pod", "--length", "600"],
    ],
)
def test_bad_settings_are_one_line(argv, tmp_path, capsys):
    directory = write_tiny_checkpoint(tmp_path / "t")
    capsys.readouterr()
    assert find_heads.main(["-m", str(directory), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_the_default_models_induction_heads_are_stable_across_seeds(default_model_dir):
    llm = engine.load(default_model_dir)
    tops = []
    for seed in (1, 2):
        args = argparse.Namespace(razor_length=300, seed=seed)
        table = torch.tensor(razor.calibrate(llm, args, lambda: None)["induction"])
        tops.append(set(table.flatten().topk(8).indices.tolist()))
    assert len(tops[0] & tops[1]) >= 6, tops
