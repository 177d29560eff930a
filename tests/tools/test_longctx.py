"""The long-context task generators (lengths, needles, answers an independent reader recovers, seeds)
and the eval_longctx runner end to end on a tiny checkpoint, resumed and multi-turn."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
from tiny import write_tiny_checkpoint

import engine
from engine import calibration
from engine.tokenizer import load_tokenizer
from tools import eval_longctx
from tools.longctx import PRESETS, TASKS, expand_tasks, make_case, score
from tools.longctx.haystack import SOURCES, sentences
from tools.prefill_specs import parse_spec

NEEDLE = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.(?:\s|$)")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    return load_tokenizer(default_model_dir)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [1500, 6000])
def test_every_task_has_the_length_and_answers_found_in_its_document(tokenizer, task, length):
    case = make_case(task, tokenizer, length, seed=3, sample=1)
    assert abs(case.tokens - length) <= 0.02 * length
    first = [{"role": "user", "content": f"{case.document}\n\n{case.questions[0].text}"}]
    assert len(tokenizer.encode_chat(first)) == case.tokens
    for question in case.questions:
        assert question.expected and all(answer in case.document for answer in question.expected)
        assert all(0.0 <= depth <= 1.0 for depth in question.depths)
    assert recovered(case) == [set(question.expected) for question in case.questions]


def recovered(case) -> list[set[str]]:
    """Each question's answers, worked out from the document alone by a reader written for the test."""
    if case.task.startswith("niah"):
        needles = NEEDLE.findall(case.document)
        answers = []
        for question in case.questions:
            keys = [key for _, key, _ in needles if re.search(rf"\b{re.escape(key)}\b", question.text)]
            answers.append({value for _, key, value in needles if key in keys})
        return answers
    if case.task == "passkey":
        return [set(re.findall(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", case.document))]
    if case.task == "vt":
        return [
            variables_bound_to(case.document, re.search(r"value (\d+)", q.text).group(1))
            for q in case.questions
        ]
    if case.task in ("cwe", "fwe"):
        words = (
            re.findall(r"\d+\. (\S+)", case.document)
            if case.task == "cwe"
            else case.document.split("\n\n", 1)[1].split()
        )
        counts = collections.Counter(words).most_common()
        top = len(case.questions[0].expected)
        assert counts[top - 1][1] > counts[top][1], (
            "the top words must be strictly more frequent than the rest"
        )
        return [{word for word, _ in counts[:top]}]
    return [{story_answer(case.document, question.text)} for question in case.questions]


def variables_bound_to(document: str, value: str) -> set[str]:
    bound = set()
    for name, source in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", document):
        if source == value or source in bound:
            bound.add(name)
    return bound


def story_answer(document: str, question: str) -> str:
    """A bAbI reader: replay the story's sentences and answer where a person or an object is (was)."""
    person_at: dict[str, str] = {}
    holder: dict[str, str] = {}
    trail: dict[str, list[str]] = collections.defaultdict(list)
    moves = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
    takes = ("picked up", "got", "grabbed", "took")
    pattern = rf"(\w+) ({'|'.join((*moves, *takes, 'dropped', 'discarded', 'put down', 'left'))}) the (\w+)\."
    for person, verb, thing in re.findall(pattern, document):
        if verb in moves:
            person_at[person] = thing
            for item, who in holder.items():
                if who == person and trail[item][-1] != thing:
                    trail[item].append(thing)
        elif verb in takes:
            holder[thing] = person
            if not trail[thing] or trail[thing][-1] != person_at[person]:
                trail[thing].append(person_at[person])
        else:
            holder.pop(thing)
    if match := re.match(r"Where is the (\w+)\?", question):
        return trail[match.group(1)][-1]
    if match := re.match(r"Where was the (\w+) before the (\w+)\?", question):
        places = trail[match.group(1)]
        assert places[-1] == match.group(2)
        return places[-2]
    return person_at[re.match(r"Where is (\w+)\?", question).group(1)]


@pytest.mark.parametrize(
    ("task", "needles"),
    [("niah_single", 1), ("niah_multikey", 4), ("niah_multivalue", 4), ("niah_multiquery", 4)],
)
def test_needles_are_present_exactly_as_often_as_intended(tokenizer, task, needles):
    case = make_case(task, tokenizer, 4000, seed=0)
    found = NEEDLE.findall(case.document)
    assert len(found) == needles and len(set(found)) == needles
    for question in case.questions:
        assert all(case.document.count(value) == 1 for value in question.expected)


def test_passkey_depths_cycle_over_samples(tokenizer):
    for sample, depth in enumerate((0.1, 0.5, 0.9, 0.1)):
        case = make_case("passkey", tokenizer, 3000, sample=sample)
        at = case.document.index("The pass key is")
        assert case.questions[0].depths == (depth,)
        assert abs(at / len(case.document) - depth) < 0.03


def test_vt_chains_have_one_to_four_hops_and_one_to_three_chains(tokenizer):
    drawn = [make_case("vt", tokenizer, 2000, sample=sample).details for sample in range(12)]
    seen = {(details["hops"], details["chains"]) for details in drawn}
    assert all(1 <= hops <= 4 and 1 <= chains <= 3 for hops, chains in seen) and len(seen) > 3


def test_same_seed_same_case_other_seed_or_source_other_text(tokenizer):
    case = make_case("niah_single", tokenizer, 3000, seed=7, sample=2)
    assert make_case("niah_single", tokenizer, 3000, seed=7, sample=2) == case
    assert make_case("niah_single", tokenizer, 3000, seed=8, sample=2).document != case.document
    other = make_case("niah_single", tokenizer, 3000, seed=7, sample=2, source="docstrings")
    assert other.document != case.document and abs(other.tokens - 3000) <= 60
    haystacks = [set(sentences(source)) for source in SOURCES]
    assert len(haystacks[0] & haystacks[1]) < 0.01 * len(haystacks[0])


@pytest.mark.parametrize("source", SOURCES)
def test_the_haystack_does_not_repeat_itself(tokenizer, source):
    case = make_case("niah_single", tokenizer, 16000, seed=0, source=source)
    prose = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", case.document) if len(s) > 40]
    last_seen: dict[str, int] = {}
    for index, sentence in enumerate(prose):
        # Documentation repeats a stock phrase now and then, never within a page of text.
        assert index - last_seen.get(sentence, -1000) > 100, sentence
        last_seen[sentence] = index


def test_multi_turn_cases_carry_independent_questions(tokenizer):
    case = make_case("niah_single", tokenizer, 4000, turns=3)
    assert len(case.questions) == 3 and len({q.expected for q in case.questions}) == 3
    assert len(NEEDLE.findall(case.document)) == 3
    qa = make_case("qa1", tokenizer, 4000, turns=3)
    assert len({q.text for q in qa.questions}) == 3
    with pytest.raises(ValueError, match="one question"):
        make_case("cwe", tokenizer, 4000, turns=2)


def test_scoring_counts_the_expected_strings_found():
    assert score("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert score("It is 1234567.", ["1234567", "7654321"]) == 0.5
    assert score("I do not know.", ["1234567", "7654321"]) == 0.0
    assert score("The KITCHEN.", ["kitchen"]) == 1.0  # case does not matter
    with pytest.raises(ValueError):
        score("anything", [])


def test_task_lists_and_presets():
    assert expand_tasks("core") == list(PRESETS["core"])
    assert expand_tasks("qa1,babilong,qa1") == ["qa1", "qa2", "qa3"]
    with pytest.raises(ValueError, match="unknown task 'qa9'"):
        expand_tasks("qa9")
    assert set(TASKS) - set(PRESETS["ruler"]) - set(PRESETS["babilong"]) == {"passkey"}


def test_impossible_lengths_are_refused(tokenizer):
    with pytest.raises(ValueError, match="needs at least"):
        make_case("niah_single", tokenizer, 50)
    with pytest.raises(ValueError, match="unknown haystack source"):
        make_case("niah_single", tokenizer, 2000, source="lorem")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = write_tiny_checkpoint(
        tmp_path_factory.mktemp("longctx") / "ckpt", max_position_embeddings=4096
    )
    model = engine.load(directory)
    heads = {"heads": [[1, "k", 0], [0, "q", 1]]}
    data = {"format": calibration.FORMAT, "model": calibration.identity(model), "reform": heads}
    (directory / calibration.CHECKPOINT_FILE).write_text(json.dumps(data))
    return directory


def run(tiny, json_path, *extra):
    argv = ["--model", str(tiny), "--tasks", "niah_single,vt,qa1", "--lengths", "1200,1600", "--samples", "1"]
    return eval_longctx.main([*argv, "--configs", "full,imdc:snapkv:256", "--json", str(json_path), *extra])


def test_eval_longctx_end_to_end_resumes_and_refuses_other_settings(tiny, tmp_path, capsys):
    json_path, png = tmp_path / "longctx.json", tmp_path / "longctx.png"
    assert run(tiny, json_path, "--plot", str(png)) == 0
    out = capsys.readouterr().out
    assert "Accuracy % by prompt length, mean over tasks" in out and png.stat().st_size > 0
    report = json.loads(json_path.read_text())
    records = report["records"]
    assert report["complete"] and len(records) == 2 * 3 * 2
    # Shortest first, every config on a case before the next: a stopped run compares them all.
    assert [r["length"] for r in records] == sorted(r["length"] for r in records)
    assert [r["config"] for r in records[:2]] == ["full", "imdc:snapkv:256:256"]
    for record in records:
        assert record["score"] == score(record["answer"], record["expected"])
        assert record["prefill_seconds"] > 0 and record["memory_bytes"] > 0
        assert abs(record["prompt_tokens"] - record["length"]) <= 0.02 * record["length"]
    summary = eval_longctx.tables(report)[0]
    full = [r["score"] for r in records if r["config"] == "full"]
    assert summary.rows[0][3] == pytest.approx(100 * sum(full) / len(full))  # one sample: mean of tasks
    # A stopped run: drop the last config's records, and the same command measures only those.
    kept = [r for r in records if r["config"] == "full"]
    json_path.write_text(json.dumps({**report, "records": kept, "complete": False}))
    assert run(tiny, json_path) == 0
    resumed = json.loads(json_path.read_text())["records"]
    assert resumed[: len(kept)] == kept and len(resumed) == len(records)
    assert run(tiny, json_path, "--seed", "1") == 2
    assert "holds a run with other settings (seed, cases_digest)" in capsys.readouterr().err


def test_eval_longctx_multi_turn_asks_every_question_over_one_memory(tiny, tmp_path):
    json_path = tmp_path / "turns.json"
    assert run(tiny, json_path, "--turns", "2") == 0
    records = json.loads(json_path.read_text())["records"]
    assert sorted({r["turn"] for r in records}) == [0, 1] and len(records) == 2 * 3 * 2 * 2
    report = json.loads(json_path.read_text())
    assert eval_longctx.tables(report)[1].title.startswith("Accuracy % by question")


def test_reform_configs_are_parsed_and_evaluated(tiny, tmp_path):
    named = parse_spec("reform:imdc:snapkv:256:gather=600:kernel=3:prefix=32")
    assert named.label == "reform:imdc:snapkv:256:256:gather=600:kernel=3:prefix=32"
    assert (named.config.reform.gather, named.config.reform.prefix) == (600, 32)
    assert dict(named.config.policy_args) == {"kernel": 3}
    json_path = tmp_path / "reform.json"
    argv = [
        "--model",
        str(tiny),
        "--tasks",
        "niah_single",
        "--lengths",
        "1500",
        "--samples",
        "1",
        "--turns",
        "2",
    ]
    argv += ["--configs", "reform:imdc:h2o:256:gather=600:prefix=32:suffix=32", "--json", str(json_path)]
    assert eval_longctx.main(argv) == 0
    records = json.loads(json_path.read_text())["records"]
    assert [r["turn"] for r in records] == [0, 1] and all(r["memory_bytes"] > 0 for r in records)
