import threading

import pytest
import torch

from engine.generate import GREEDY, Sampler, Sampling, generate_tokens, penalize_repeats


def draws(sampling, logits, n=400, history=()):
    sampler = Sampler(sampling)
    return {sampler(logits, list(history)) for _ in range(n)}


LOGITS = torch.tensor([4.0, 3.5, 3.0, 1.0, 0.5, -1.0, -2.0, -5.0])


def test_greedy_is_argmax_and_seed_reproduces():
    assert draws(GREEDY, LOGITS, n=5) == {0}
    a, b = (
        Sampler(Sampling(seed=7, top_k=0, top_p=1, min_p=0)),
        Sampler(Sampling(seed=7, top_k=0, top_p=1, min_p=0)),
    )
    assert [a(LOGITS, []) for _ in range(50)] == [b(LOGITS, []) for _ in range(50)]


def test_top_k_top_p_min_p_truncate_before_temperature():
    # A very high temperature flattens what is left, so every survivor shows up, and nothing else.
    hot = dict(temperature=100.0, seed=0)
    assert draws(Sampling(top_k=3, top_p=1, min_p=0, **hot), LOGITS) == {0, 1, 2}
    probs = LOGITS.softmax(-1)
    nucleus = int((probs.cumsum(-1) < 0.9).sum()) + 1
    assert draws(Sampling(top_k=0, top_p=0.9, min_p=0, **hot), LOGITS) == set(range(nucleus))
    survivors = {i for i, p in enumerate(probs) if p >= 0.1 * probs[0]}
    assert draws(Sampling(top_k=0, top_p=1, min_p=0.1, **hot), LOGITS) == survivors


def test_repeat_penalty_follows_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0, 3.0])
    penalized = penalize_repeats(logits, [0, 1, 1], 2.0)
    assert penalized.tolist() == [1.0, -4.0, 1.0, 3.0]
    # Only the last repeat_last_n tokens count: token 3 (repeated long ago) keeps its lead.
    sampling = Sampling(temperature=0, repeat_penalty=10.0, repeat_last_n=2)
    assert Sampler(sampling)(logits, [3, 0, 0]) == 3
    assert Sampler(sampling)(logits, [0, 3]) == 2


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_bad_top_p_is_refused(value):
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=value)


class Letters:
    """A stand-in streaming decoder: token i is the i-th letter."""

    def push(self, token):
        return "abcdefghijklmnopqrstuvwxyz"[token]

    def flush(self):
        return ""


def run(script, **options):
    """Generate with 'logits' that force the tokens of ``script`` in turn."""
    fed = []

    def logits_for(index):
        out = torch.full((26,), -10.0)
        out[script[min(index, len(script) - 1)]] = 10.0
        return out

    def step(token):
        fed.append(token)
        return logits_for(len(fed))

    pieces = []
    result = generate_tokens(
        step, logits_for(0), Sampler(GREEDY), Letters(), history=[], on_text=pieces.append, **options
    )
    return result, fed, "".join(pieces)


def test_stops_on_every_eos_id_without_feeding_it():
    result, fed, streamed = run([0, 1, 25, 2], max_tokens=10, eos_ids=(24, 25))
    assert (result.token_ids, result.text, result.finish_reason) == ([0, 1], "ab", "eos")
    assert fed == [0, 1] and streamed == "ab"


def test_length_limit_feeds_every_accepted_token():
    result, fed, _ = run([0, 1, 2, 3, 4], max_tokens=3, eos_ids=())
    assert result.finish_reason == "length" and result.token_ids == fed == [0, 1, 2]


def test_stop_strings_cut_the_text_and_are_never_streamed():
    # "c" alone might start the stop string "cd": it is held back, then dropped with it.
    result, _, streamed = run([0, 1, 2, 3, 4], max_tokens=10, eos_ids=(), stop=["cd"])
    assert (result.text, result.finish_reason, streamed) == ("ab", "stop", "ab")
    # A held-back prefix that turns out not to be a stop string is released.
    result, _, streamed = run([0, 2, 4], max_tokens=3, eos_ids=(), stop=["cd"])
    assert result.text == streamed == "ace"


def test_cancel_stops_between_tokens():
    cancel = threading.Event()
    cancel.set()
    result, fed, _ = run([0, 1], max_tokens=10, eos_ids=(), cancel=cancel)
    assert result.finish_reason == "cancelled" and result.token_ids == [] and fed == []


@pytest.mark.parametrize("max_tokens", [None, -1, -5])
def test_no_limit_means_until_end_of_sequence(max_tokens):
    result, fed, _ = run([0, 1, 2, 25], max_tokens=max_tokens, eos_ids=(25,))
    assert (result.token_ids, result.finish_reason) == ([0, 1, 2], "eos") and fed == [0, 1, 2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"min_p": float("nan")}, "min_p must be a finite number"),
        ({"top_k": 2.5}, "top_k must be a whole number, got 2.5"),
        ({"repeat_penalty": "high"}, "repeat_penalty must be a finite number, got 'high'"),
    ],
)
def test_non_finite_or_wrongly_typed_sampling_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**options)


def test_presence_and_frequency_penalties_follow_openai():
    sampler = Sampler(Sampling(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3))
    logits = torch.tensor([1.0, 0.9, 0.0])
    assert sampler(logits, []) == 0  # nothing generated yet: no penalty
    assert sampler(logits, []) == 1  # token 0 now costs 0.5 + 0.3 = 0.8: 0.2 < 0.9
    assert sampler(logits, []) == 0  # 0.2 vs 0.9 - 0.8 = 0.1
    assert sampler(logits, []) == 1  # 1.0 - 0.5 - 0.6 = -0.1 vs 0.1
    with pytest.raises(ValueError, match="presence_penalty must be between -2 and 2"):
        Sampling(presence_penalty=3.0)
