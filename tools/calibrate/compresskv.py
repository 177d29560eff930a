"""CompressKV's offline facts: each layer's semantic retrieval heads and its compression error
(Lin et al., 2025).

Retrieval heads: needle-in-a-haystack prompts (``niah_single``) are answered greedily with full
attention; for every query head, the attention the answer's queries put on the needle's tokens is
averaged, over the runs whose answer is right (all runs, and the file says so, when none is).
Errors: on the same prompts, each layer's memory is compressed as CompressKV does it (SnapKV votes of
the last ``window`` queries from the layer's best ``heads`` retrieval heads, ``--compresskv-budget``
tokens kept), and the relative error of those queries' attention output, through the layer's output
projection, is ``||O_kept - O_full|| / ||O_full||``. The engine shares a step's budget over layers in
proportion to these errors.
"""

from __future__ import annotations

import argparse

import torch

from engine.generate import GREEDY
from engine.llm import LLM
from engine.prefill import PrefillConfig
from policies.compresskv import CompressKV
from policies.snapkv import window_votes
from tools.calibrate import fact_tokens, prompt, rotated
from tools.longctx import make_case, score

NAME = "compresskv"
TASK = "niah_single"


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compresskv-samples", type=int, default=6, help="needle prompts (default: %(default)s)"
    )
    parser.add_argument(
        "--compresskv-budget", type=int, default=256,
        help="tokens kept per layer when measuring errors (default: %(default)s)",
    )  # fmt: skip


def units(args: argparse.Namespace) -> int:
    return 2 * args.compresskv_samples


def calibrate(llm: LLM, args: argparse.Namespace, advance) -> dict:
    config = llm.config
    defaults = CompressKV()
    prompts, answered = [], 0
    retrieval = torch.zeros(config.num_layers, config.num_heads)
    every = torch.zeros_like(retrieval)
    for sample in range(args.compresskv_samples):
        case = make_case(TASK, llm.tokenizer, args.length, seed=args.seed, sample=sample)
        text, ids = prompt(llm, case)
        needle = fact_tokens(llm, text, case.questions[0].facts)
        prompts.append(ids)
        answer = llm.generate(ids, sampling=GREEDY, max_tokens=case.answer_tokens)
        mass = needle_attention(llm, ids, answer.token_ids, needle)
        every += mass
        if score(answer.text, case.questions[0].expected) > 0.5:
            retrieval += mass
            answered += 1
        advance()
    retrieval = (retrieval / answered) if answered else every / len(prompts)
    chosen = retrieval.topk(min(defaults.heads, config.num_heads), dim=1).indices
    errors = torch.zeros(config.num_layers)
    for ids in prompts:
        errors += layer_errors(llm, ids, chosen, args.compresskv_budget, defaults)
        advance()
    return {
        "retrieval": retrieval.tolist(),
        "layer_error": (errors / len(prompts)).tolist(),
        "answered": answered,
        "samples": len(prompts),
        "task": TASK,
        "length": args.length,
        "budget": args.compresskv_budget,
        "seed": args.seed,
    }


def needle_attention(llm: LLM, ids: list[int], answer: list[int], needle: list[int]) -> torch.Tensor:
    """[layers, Hq]: the mean attention mass that the queries producing ``answer`` put on ``needle``."""
    sequence = ids + answer[:-1]
    rows = torch.arange(len(ids) - 1, len(sequence))
    mass = torch.zeros(llm.config.num_layers, llm.config.num_heads)

    def tap(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        probabilities = attention(rotated(llm, q[0])[:, rows], rotated(llm, k[0]), rows)
        mass[layer] = probabilities[..., needle].sum(dim=-1).mean(dim=-1)

    llm.prefill(sequence, PrefillConfig(), tap=tap)
    return mass


def layer_errors(
    llm: LLM, ids: list[int], heads: torch.Tensor, budget: int, policy: CompressKV
) -> torch.Tensor:
    """[layers]: each layer's relative output error with its memory compressed as CompressKV does."""
    errors = torch.zeros(llm.config.num_layers)
    window = policy.window
    rows = torch.arange(len(ids) - window, len(ids))

    def tap(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        queries, keys, values = rotated(llm, q[0])[:, rows], rotated(llm, k[0]), v[0].float()
        probabilities = attention(queries, keys, rows)  # [Hq, window, n]
        prefix = len(ids) - window
        votes = probabilities[heads[layer], :, :prefix].sum(dim=1).mean(dim=0)  # [prefix]
        count = torch.full((prefix,), window)
        scores = window_votes(votes[None, None], count, policy.kernel, "chunk")[0, 0]
        kept = torch.cat((scores.topk(min(budget, prefix)).indices.sort().values, rows))
        full = output(llm, layer, probabilities, values)
        part = attention(queries, keys[:, kept], rows, kept)
        compressed = output(llm, layer, part, values[:, kept])
        errors[layer] = (compressed - full).norm() / full.norm().clamp_min(1e-12)

    llm.prefill(ids, PrefillConfig(), tap=tap)
    return errors


def attention(
    queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention probabilities [Hq, rows, n] of ``queries`` at positions ``rows`` over ``keys``
    [Hkv, n, D] at positions ``columns`` (default 0..n-1)."""
    heads, dim = queries.shape[0], queries.shape[-1]
    keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)
    columns = torch.arange(keys.shape[1]) if columns is None else columns
    scores = queries @ keys.transpose(1, 2) / dim**0.5
    return scores.masked_fill(columns[None, None, :] > rows[None, :, None], float("-inf")).softmax(dim=-1)


def output(llm: LLM, layer: int, probabilities: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The layer's attention output through its output projection [rows, hidden]."""
    values = values.repeat_interleave(probabilities.shape[0] // values.shape[0], dim=0)
    heads = probabilities @ values  # [Hq, rows, D]
    flat = heads.transpose(0, 1).flatten(1)
    projection = llm.model.model.layers[layer].self_attn.o_proj
    return projection(flat.to(llm.dtype)).float()


def summary(section: dict) -> str:
    errors = section["layer_error"]
    worst = max(range(len(errors)), key=errors.__getitem__)
    answered = f"{section['answered']} of {section['samples']} needle answers right"
    if not section["answered"]:
        answered += " (retrieval heads from all runs)"
    return f"CompressKV: {answered}; layer errors {min(errors):.3f}..{max(errors):.3f}, most at layer {worst}"
