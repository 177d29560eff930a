"""Check every attention backend against the reference, time them, and list what each supports.

    python -m tools.check_backends test [--backend NAME] [--op OP] [--filter REGEX]
    python -m tools.check_backends perf [--lengths 4096,16384,32768] [--chunk N] [--head-dim 128] ...
    python -m tools.check_backends support [--device cpu]

``test`` runs each backend on a fixed list of cases and compares it with ``reference`` by
FlashAttention's rule: the error of a backend may be at most twice the error of the same math done
in plain PyTorch in the input's dtype, plus 1e-5; NaN or mismatched infinities always fail, and
outputs are written into views of larger NaN-filled buffers whose margins must stay bit-identical.
Cases named ``ragged`` give each KV head its own memory length (``Segments`` in flat buffers whose
unused rows hold NaN, so reading past a segment shows), those named ``bias`` give entries logit
biases log n; ``--filter ragged`` or ``--filter bias`` runs just them. The property suite in
``tests/backends`` draws its cases with Hypothesis and checks them with the same ``run_case``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import backends
from backends import AttentionSpec, Backend, Segments
from backends.reference import visible
from engine.cli import Parser, run_main
from engine.registry import load_plugin

OPS = ("prefill", "scores", "scores_last", "scores_heads", "decode")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ABSOLUTE_FLOOR = 1e-5
# Column sums of probabilities total the number of scored rows exactly, up to float32 summation.
TOTAL_RELATIVE_TOLERANCE = 1e-5


class CheckError(ValueError):
    """A command-line argument the harness cannot use."""


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    """One attention problem: ``q_len`` chunk queries against ``memory`` cached keys plus the chunk.

    With ``memories`` (one count per (batch, KV head), in that order) each KV head holds its own
    number of cached keys, and the keys come as ``Segments``; ``memory`` is then unused. With
    ``bias`` every entry carries a logit bias log n, n drawn from 1..8 (for merged entries)."""

    batch: int
    kv_heads: int
    group: int
    head_dim: int
    q_len: int
    memory: int
    window: int | None = None
    dtype: torch.dtype = torch.float32
    strided: bool = False  # q, k, v as [B, L, H, D] storage seen through a transpose
    last: int = 8  # rows scored by ``scores_last``
    seed: int = 0
    memories: tuple[int, ...] | None = None  # per KV head: heads of different lengths (ragged)
    bias: bool = False

    def __post_init__(self) -> None:
        if self.memories is not None and len(self.memories) != self.batch * self.kv_heads:
            raise ValueError(f"memories needs {self.batch * self.kv_heads} counts, got {len(self.memories)}")

    @property
    def ragged(self) -> bool:
        return self.memories is not None

    @property
    def lengths(self) -> list[int]:
        """Keys per (batch, KV head): memory + chunk."""
        memories = self.memories or [self.memory] * (self.batch * self.kv_heads)
        return [memory + self.q_len for memory in memories]

    @property
    def k_len(self) -> int:
        """Keys of the longest KV head (of every head when not ragged)."""
        return max(self.lengths)

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group

    @property
    def name(self) -> str:
        dtype = next(short for short, dtype in DTYPES.items() if dtype == self.dtype)
        parts = [f"b{self.batch}", f"kv{self.kv_heads}", f"g{self.group}", f"d{self.head_dim}"]
        memory = "/".join(map(str, self.memories)) if self.ragged else str(self.memory)
        parts += [f"q{self.q_len}", f"m{memory}", f"w{self.window}" if self.window else "full", dtype]
        flags = [("strided", self.strided), ("ragged", self.ragged), ("bias", self.bias)]
        return "-".join(parts + [flag for flag, on in flags if on])

    def spec(self, op: str, device: str) -> AttentionSpec:
        stats = op.startswith("scores")
        return AttentionSpec(
            self.head_dim, self.group, self.dtype, device, self.window, stats, self.ragged, self.bias,
            query_head_stats=op == "scores_heads",
        )  # fmt: skip

    def tensors(self, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D]: standard normal, the same on every device."""
        generator = torch.Generator().manual_seed(self.seed)

        def draw(heads: int, length: int) -> torch.Tensor:
            if self.strided:
                storage = torch.randn(self.batch, length, heads, self.head_dim, generator=generator)
                return storage.to(device=device, dtype=self.dtype).transpose(1, 2)
            storage = torch.randn(self.batch, heads, length, self.head_dim, generator=generator)
            return storage.to(device=device, dtype=self.dtype)

        return (
            draw(self.q_heads, self.q_len),
            draw(self.kv_heads, self.k_len),
            draw(self.kv_heads, self.k_len),
        )

    def inputs(
        self, device: str
    ) -> tuple[torch.Tensor, torch.Tensor | Segments, torch.Tensor | None, torch.Tensor | None]:
        """(q, k, v, bias) as a backend takes them: ``tensors`` with a bias [B, Hkv, Lk] or None, or
        for a ragged case q, ``Segments`` (biased or not), None, None. The segments lie in their
        flat buffers in reverse order with a gap of NaN rows (NaN biases) after each; with
        ``strided`` the buffers are every other [D] row of their storage."""
        q, k, v = self.tensors(device)
        generator = torch.Generator().manual_seed(self.seed + 1)
        if not self.ragged:
            return q, k, v, self._biases((self.batch, self.kv_heads, self.k_len), generator, device)
        lengths = self.lengths
        offsets, start = [0] * len(lengths), 0
        for s in reversed(range(len(lengths))):
            offsets[s], start = start, start + lengths[s] + 3
        rows = (start, 2, self.head_dim) if self.strided else (start, self.head_dim)
        keys = torch.full(rows, float("nan"), dtype=self.dtype, device=device)
        values = torch.full(rows, float("nan"), dtype=self.dtype, device=device)
        keys, values = (keys[:, 0], values[:, 0]) if self.strided else (keys, values)
        bias = self._biases((start,), generator, device)
        for s, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
            b, h = divmod(s, self.kv_heads)
            # Each head's keys are the rectangular ones' last ``length``: its memory, then the chunk.
            keys[offset : offset + length] = k[b, h, self.k_len - length :]
            values[offset : offset + length] = v[b, h, self.k_len - length :]
            if bias is not None:
                bias[offset + length : offset + length + 3] = float("nan")
        return q, Segments(keys, values, offsets, lengths, (self.batch, self.kv_heads), bias), None, None

    def _biases(self, shape: tuple, generator: torch.Generator, device: str) -> torch.Tensor | None:
        if not self.bias:
            return None
        return torch.randint(1, 9, shape, generator=generator).float().log().to(device)


CASES = [
    Case(1, 1, 1, 64, q_len=1, memory=0),
    Case(1, 1, 1, 16, q_len=7, memory=0, dtype=torch.float16, last=3),
    Case(2, 2, 3, 64, q_len=37, memory=91, dtype=torch.bfloat16, seed=1),
    Case(1, 3, 3, 64, q_len=64, memory=130, window=50, strided=True, seed=2),
    Case(1, 2, 4, 128, q_len=100, memory=150, dtype=torch.float16, window=17, seed=3),
    Case(2, 1, 2, 32, q_len=19, memory=0, window=5, dtype=torch.bfloat16, last=19, seed=4),
    Case(1, 2, 2, 128, q_len=65, memory=64, dtype=torch.bfloat16, strided=True, seed=5),
    Case(1, 1, 1, 256, q_len=33, memory=33, window=1, seed=6),
    Case(1, 1, 3, 64, q_len=1, memory=200, window=64, dtype=torch.float16, last=1, seed=7),
    # KV heads of different lengths: one holding only the chunk, one far longer than the rest.
    Case(2, 2, 3, 64, q_len=9, memory=0, memories=(5, 0, 300, 40), dtype=torch.bfloat16, last=4, seed=8),
    Case(1, 3, 2, 32, q_len=1, memory=0, memories=(0, 17, 260), window=48, strided=True, bias=True, seed=9),
    Case(
        1,
        2,
        4,
        128,
        q_len=40,
        memory=0,
        memories=(200, 0),
        window=30,
        dtype=torch.float16,
        bias=True,
        seed=10,
    ),
    Case(2, 1, 3, 16, q_len=13, memory=70, bias=True, last=5, seed=11),
]


# ---------------------------------------------------------------------------------------------
# The yardstick: the same attention math in plain PyTorch, in a chosen dtype


def plain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Lq, D], lse [B, Hq, Lq], probabilities [B, Hq, Lq, Lk]), every step computed in
    ``dtype`` (default: q's): the error this has against the float32 reference is what rounding to
    that dtype costs, and what a backend is allowed twice of. ``k`` may be ``Segments`` (``v`` is
    then None): see ``dense``."""
    k, v, bias = dense(k, v, bias)
    dtype = dtype or q.dtype
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = k.to(dtype).repeat_interleave(group, dim=1)
    values = v.to(dtype).repeat_interleave(group, dim=1)
    scores = q.to(dtype) @ keys.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.to(dtype).repeat_interleave(group, dim=1)[:, :, None]
    scores = scores.masked_fill(~visible(q.shape[2], k.shape[2], window, q.device), float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    return probabilities @ values, torch.logsumexp(scores, dim=-1), probabilities


def dense(
    k: torch.Tensor | Segments, v: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(k, v, bias) as rectangular tensors: ``Segments`` left-padded to the longest with zero keys
    and values of bias -inf. Under the bottom-right causal alignment (and the window) a query sees
    a padded key exactly when it sees the segment's key, so the problem is the same, and each
    segment's probabilities come out right-aligned as ``scores`` reports them."""
    if not isinstance(k, Segments):
        return k, v, bias
    batch, kv_heads = k.shape
    longest, dim = k.longest, k.keys.shape[1]
    keys = k.keys.new_zeros(batch, kv_heads, longest, dim)
    values = k.values.new_zeros(batch, kv_heads, longest, dim)
    biases = torch.full((batch, kv_heads, longest), float("-inf"), device=k.keys.device)
    for s in range(batch * kv_heads):
        b, h = divmod(s, kv_heads)
        segment_keys, segment_values, segment_bias = k[s]
        start = longest - k.lengths[s]
        keys[b, h, start:], values[b, h, start:] = segment_keys, segment_values
        biases[b, h, start:] = 0.0 if segment_bias is None else segment_bias
    return keys, values, biases


def upcast(k: torch.Tensor | Segments) -> torch.Tensor | Segments:
    """Keys (tensor or ``Segments``) in float32, as the reference gets them."""
    if isinstance(k, Segments):
        return dataclasses.replace(k, keys=k.keys.float(), values=k.values.float())
    return k.float()


def plain_mass(probabilities: torch.Tensor, kv_heads: int, first: int) -> torch.Tensor:
    """[B, Hkv, Lk] float32: probabilities of rows ``first:`` summed over rows and each group's heads
    (per query head when ``kv_heads`` is the number of query heads)."""
    batch, q_heads, _, k_len = probabilities.shape
    scored = probabilities[:, :, first:].float().reshape(batch, kv_heads, q_heads // kv_heads, -1, k_len)
    return scored.sum(dim=(2, 3))


# ---------------------------------------------------------------------------------------------
# Comparisons


@dataclass(frozen=True)
class Check:
    """One quantity of one run: its error and the error it was allowed."""

    quantity: str
    error: float
    allowed: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.allowed  # NaN compares false

    @property
    def ratio(self) -> float:
        if self.passed and self.error == 0:
            return 0.0
        return self.error / self.allowed if self.passed and self.allowed > 0 else math.inf


def compare(quantity: str, result: torch.Tensor, reference: torch.Tensor, plain: torch.Tensor) -> Check:
    """FlashAttention's rule: max |result - reference| <= 2 max |plain - reference| + 1e-5 over the
    reference's finite entries; any NaN, or an infinity where the reference has none (or another),
    fails outright."""
    result, reference, plain = result.float(), reference.float(), plain.float()
    if result.shape != reference.shape:
        return Check(quantity, math.nan, 0.0, f"shape {list(result.shape)}, expected {list(reference.shape)}")
    finite = torch.isfinite(reference)
    plain_error = _max_abs((plain - reference)[finite & torch.isfinite(plain)])
    allowed = 2 * plain_error + ABSOLUTE_FLOOR
    if torch.isnan(result).any():
        return Check(quantity, math.nan, allowed, "NaN")
    if not torch.equal(result[~finite], reference[~finite]) or torch.isinf(result[finite]).any():
        return Check(quantity, math.inf, allowed, "infinities differ")
    return Check(quantity, _max_abs((result - reference)[finite]), allowed)


def _max_abs(values: torch.Tensor) -> float:
    return values.abs().max().item() if values.numel() else 0.0


def sentinel_view(shape: Sequence[int], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a NaN-filled buffer one element wider than ``shape`` on each side of every
    dimension (three on the last, so the view is not contiguous), and the view of ``shape`` inside."""
    padded = [size + 2 for size in shape[:-1]] + [shape[-1] + 4]
    buffer = torch.full(padded, float("nan"), dtype=dtype, device=device)
    return buffer, buffer[tuple(slice(1, 1 + size) for size in shape)]


def margins_check(
    buffer: torch.Tensor, before: torch.Tensor, view: torch.Tensor, result: torch.Tensor
) -> Check:
    """The buffer outside ``view`` kept its bits, and ``view`` holds the returned result."""
    inside = torch.zeros(buffer.shape, dtype=torch.bool, device=buffer.device)
    inside[tuple(slice(1, 1 + size) for size in view.shape)] = True
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[buffer.element_size()]
    changed = (buffer.view(bits) != before.view(bits)) & ~inside
    written = result.data_ptr() == view.data_ptr() or torch.equal(result, view)
    return Check("margins", float(changed.sum().item()) + (0.0 if written else 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# Running one op of one case on one backend


def run_case(op: str, backend: Backend, case: Case, device: str) -> list[Check] | None:
    """The checks of ``op`` on ``case``, or None when the backend does not support it."""
    if op not in OPS:
        raise CheckError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    if not backend.supports(case.spec(op, device)):
        return None
    q, k, v, bias = case.inputs(device)
    reference = backends.get("reference")
    if op == "prefill":
        return _check_attention(backend.prefill, reference.prefill, q, k, v, bias, case.window)
    if op == "decode":
        return _check_attention(backend.decode, reference.decode, q[:, :, -1:], k, v, bias, case.window)
    last = case.last if op in ("scores_last", "scores_heads") else None
    return _check_scores(
        backend, reference, q, k, v, bias, case, last=last, by_query_head=op == "scores_heads"
    )


def _check_attention(run: Callable, oracle: Callable, q, k, v, bias, window: int | None) -> list[Check]:
    # Upcast first so that the reference output is not rounded back to q's dtype: ``ref_fp32``.
    expected = oracle(q.float(), upcast(k), None if v is None else v.float(), window=window, bias=bias)
    plain_out, plain_lse, _ = plain_attention(q, k, v, window=window, bias=bias)
    buffer, view = sentinel_view(q.shape, q.dtype, str(q.device))
    before = buffer.clone()
    result = run(q, k, v, window=window, out=view, **_biased(bias))
    checks = [
        compare("out", result.out, expected.out, plain_out),
        margins_check(buffer, before, view, result.out),
    ]
    if result.lse is not None:
        checks.append(compare("lse", result.lse, expected.lse, plain_lse))
    return checks


def _check_scores(
    backend: Backend, reference: Backend, q, k, v, bias, case: Case, last: int | None, by_query_head: bool
) -> list[Check]:
    """All rows use the LSE of the backend's own prefill (the engine's path); the last-w rows make the
    backend recompute it. ``by_query_head``: the mass of each query head, not summed over its group."""
    window = case.window
    lse = backend.prefill(q, k, v, window=window, **_biased(bias)).lse if last is None else None
    per_head = {"by_query_head": True} if by_query_head else {}
    expected = reference.scores(q, k, last=last, window=window, bias=bias, **per_head)
    first = 0 if last is None else max(0, case.q_len - last)
    _, _, probabilities = plain_attention(q, k, v, window=window, bias=bias)
    heads = case.q_heads if by_query_head else case.kv_heads
    buffer, view = sentinel_view((case.batch, heads, case.k_len), torch.float32, str(q.device))
    before = buffer.clone()
    result = backend.scores(q, k, lse=lse, last=last, window=window, out=view, **_biased(bias), **per_head)
    total = (case.q_len - first) * (1 if by_query_head else case.group)
    totals = result.mass.sum(dim=-1)
    return [
        compare("mass", result.mass, expected.mass, plain_mass(probabilities, heads, first)),
        Check("totals", _max_abs(totals - total), TOTAL_RELATIVE_TOLERANCE * total + ABSOLUTE_FLOOR),
        _count_check(result.count, expected.count),
        margins_check(buffer, before, view, result.mass),
    ]


def _biased(bias: torch.Tensor | None) -> dict:
    """The ``bias`` argument for a backend: none at all without one (for backends older than it)."""
    return {} if bias is None else {"bias": bias}


def _count_check(count: torch.Tensor, expected: torch.Tensor) -> Check:
    if count.shape != expected.shape:
        return Check("count", math.nan, 0.0, f"shape {list(count.shape)}, expected {list(expected.shape)}")
    return Check("count", float(_max_abs((count.cpu() - expected.cpu()).float())), 0.0)


# ---------------------------------------------------------------------------------------------
# test


@dataclass(frozen=True)
class Outcome:
    op: str
    case: str
    backend: str
    result: str  # "pass", "FAIL", "unsupported", "unavailable"
    quantity: str = ""
    error: float = math.nan
    allowed: float = math.nan


def run_tests(names: Sequence[str], ops: Sequence[str], cases: Sequence[Case], device: str) -> list[Outcome]:
    outcomes = []
    for name in names:
        backend = _load(name)
        for op in ops:
            for case in cases:
                if backend is None:
                    outcomes.append(Outcome(op, case.name, name, "unavailable"))
                    continue
                checks = run_case(op, backend, case, device)
                if checks is None:
                    outcomes.append(Outcome(op, case.name, name, "unsupported"))
                    continue
                failed = [check for check in checks if not check.passed]
                worst = failed[0] if failed else max(checks, key=lambda check: check.ratio)
                quantity = f"{worst.quantity} ({worst.note})" if worst.note else worst.quantity
                result = "FAIL" if failed else "pass"
                outcomes.append(Outcome(op, case.name, name, result, quantity, worst.error, worst.allowed))
    return outcomes


def _load(name: str) -> Backend | None:
    try:
        return backends.get(name)
    except ImportError:
        return None


def _test(args: argparse.Namespace) -> int:
    names = args.backend or [name for name in backends.available() if name not in ("auto", "reference")]
    ops = args.op or list(OPS)
    pattern = re.compile(args.filter or "")
    cases = [case for case in CASES if pattern.search(case.name)]
    if not cases:
        raise CheckError(
            f"--filter {args.filter!r} matches no case; cases are: {', '.join(c.name for c in CASES)}"
        )
    outcomes = run_tests(names, ops, cases, args.device)
    rows = [
        [o.op, o.case, o.backend, o.result, o.quantity, _number(o.error), _number(o.allowed)]
        for o in outcomes
    ]
    print(_markdown(["op", "case", "backend", "result", "worst", "max error", "allowed"], rows))
    failures = sum(outcome.result == "FAIL" for outcome in outcomes)
    passes = sum(outcome.result == "pass" for outcome in outcomes)
    others = len(outcomes) - passes - failures
    print(f"\n{passes} passed, {failures} failed, {others} unsupported or unavailable")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# perf


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None, last: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with explicit probabilities, as "eager" model code computes it (float32 softmax of
    the full [Lq, Lk] matrix, cast back): (out, per-KV-head key mass of the last ``last`` rows)."""
    group = q.shape[1] // k.shape[1]
    keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~visible(q.shape[2], k.shape[2], window, q.device), float("-inf"))
    probabilities = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    first = 0 if last is None else max(0, q.shape[2] - last)
    return probabilities @ values, plain_mass(probabilities, k.shape[1], first)


def visible_pairs(case: Case, rows: int | None = None) -> int:
    """(query, key) pairs that attend, over the last ``rows`` chunk queries (all by default)."""
    first = 0 if rows is None else max(0, case.q_len - rows)
    positions = range(case.memory + first, case.k_len)
    return sum(p + 1 if case.window is None else min(p + 1, case.window) for p in positions)


def rate(case: Case, op: str, seconds: float) -> dict[str, float]:
    """TFLOP/s of the matrix products (visible pairs only), or GB/s of the K/V that decode reads."""
    if op == "decode":
        keys = case.k_len if case.window is None else min(case.k_len, case.window)
        moved = 2 * case.batch * case.kv_heads * keys * case.head_dim * torch.finfo(case.dtype).bits / 8
        return {"GB/s": moved / seconds / 1e9}
    products = 2 if op == "prefill" else 1  # QK^T and PV; the score kernels redo QK^T only
    pairs = visible_pairs(case, case.last if op == "scores_last" else None)
    return {"TFLOP/s": 2 * products * case.batch * case.q_heads * case.head_dim * pairs / seconds / 1e12}


def _time(run: Callable[[], object], device: str, repeats: int) -> tuple[float, float | None]:
    """(median seconds, peak extra bytes or None on the CPU) of ``run``."""
    if device.startswith("cuda"):
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times), peak
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), None


PERF_COLUMNS = (
    "op",
    "keys",
    "queries",
    "backend",
    "ms",
    "TFLOP/s",
    "GB/s",
    "peak MiB",
    "scores/forward",
    "note",
)


def _perf(args: argparse.Namespace) -> int:
    device = args.device
    cuda = device.startswith("cuda")
    heads, kv_heads = args.heads or (32 if cuda else 8), args.kv_heads or (8 if cuda else 2)
    if heads % kv_heads:
        raise CheckError(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
    lengths = _ints(args.lengths or ("4096,16384,32768" if cuda else "256,1024"), "--lengths")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    head_dim = args.head_dim or (128 if cuda else 64)
    repeats = args.repeats or (10 if cuda else 3)
    names = args.backend or [name for name in backends.available() if name != "auto"]
    rows: list[dict] = []
    for length in lengths:
        chunk = min(args.chunk or length, length)
        group = heads // kv_heads
        problem = Case(
            args.batch, kv_heads, group, head_dim, chunk, length - chunk, args.window, dtype, last=args.last
        )
        q, k, v = problem.tensors(device)
        spec = problem.spec("scores", device)
        for name in names:
            backend = _load(name)
            if backend is None or not backend.supports(spec):
                print(f"note: {name!r} is unavailable or does not support {spec.describe()}", file=sys.stderr)
                continue
            if getattr(backend, "interpreted", False) and not args.include_interpreted:
                print(
                    f"note: skipping {name!r}, interpreted here (add --include-interpreted)", file=sys.stderr
                )
                continue
            rows += _measure(_operations(backend, problem, q, k, v), name, problem, device, repeats)
        rows += _measure(_operations(None, problem, q, k, v), "eager", problem, device, repeats)
    _relate_scores_to_forward(rows)
    print(
        _markdown(PERF_COLUMNS, [[_number(row.get(column, "")) for column in PERF_COLUMNS] for row in rows])
    )
    if args.json:
        settings = {"device": device, "dtype": str(dtype), "heads": heads, "kv_heads": kv_heads}
        settings |= {"head_dim": head_dim, "batch": args.batch, "window": args.window, "last": args.last}
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, default=str))
    return 0


def _operations(backend: Backend | None, problem: Case, q, k, v) -> dict[str, Callable[[], object]]:
    """The timed calls of ``backend``, or of eager attention when None (whose prefill materialises the
    probabilities and so yields the key mass too: it has no separate score op). Scoring all rows
    reuses the prefill's LSE, computed once, during the untimed first run."""
    window, last = problem.window, problem.last
    if backend is None:
        return {
            "prefill": lambda: eager_attention(q, k, v, window=window),
            "decode": lambda: eager_attention(q[:, :, -1:], k, v, window=window),
        }

    @functools.cache
    def lse() -> torch.Tensor | None:
        return backend.prefill(q, k, v, window=window).lse

    return {
        "prefill": lambda: backend.prefill(q, k, v, window=window),
        "scores": lambda: backend.scores(q, k, lse=lse(), window=window),
        "scores_last": lambda: backend.scores(q, k, last=last, window=window),
        "decode": lambda: backend.decode(q[:, :, -1:], k, v, window=window),
    }


def _measure(operations: dict, name: str, problem: Case, device: str, repeats: int) -> list[dict]:
    rows = []
    for op, run in operations.items():
        row: dict = {"op": op, "keys": problem.k_len, "queries": 1 if op == "decode" else problem.q_len}
        row["backend"] = name
        if name == "eager" and op == "prefill":
            row["note"] = "materialises probabilities (key mass included)"
        try:
            seconds, peak = _time(run, device, repeats)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**row, "note": "out of memory"})
            continue
        row["ms"] = seconds * 1e3
        row["peak MiB"] = None if peak is None else peak / 2**20
        rows.append({**row, **rate(problem, op, seconds)})
    return rows


def _relate_scores_to_forward(rows: list[dict]) -> None:
    """Each score row's time as a fraction of the same backend's prefill at the same length."""
    forward = {(row["backend"], row["keys"]): row.get("ms") for row in rows if row["op"] == "prefill"}
    for row in rows:
        base = forward.get((row["backend"], row["keys"]))
        if row["op"].startswith("scores") and base and row.get("ms"):
            row["scores/forward"] = row["ms"] / base


# ---------------------------------------------------------------------------------------------
# support

SUPPORT_HEAD_DIMS = (16, 32, 64, 80, 128, 256)


def support_matrix(names: Sequence[str], devices: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): for each dtype x head dim x window x stats x device, which backends say yes."""
    loaded = [(name, _load(name)) for name in names]
    rows = []
    for device in devices:
        for dtype_name, dtype in DTYPES.items():
            for head_dim in SUPPORT_HEAD_DIMS:
                for window in (None, 4096):
                    for stats in (False, True):
                        spec = AttentionSpec(head_dim, 3, dtype, device, window, stats)
                        cells = [_supported(backend, spec) for _, backend in loaded]
                        rows.append(
                            [device, dtype_name, str(head_dim), str(window or "-"), _yes(stats), *cells]
                        )
    return ["device", "dtype", "head dim", "window", "stats", *names], rows


def _supported(backend: Backend | None, spec: AttentionSpec) -> str:
    if backend is None:
        return "unavailable"
    if backend.supports(spec) and spec.device == "cpu" and getattr(backend, "interpreted", False):
        return "interpreted"
    return _yes(backend.supports(spec))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _support(args: argparse.Namespace) -> int:
    names = args.backend or [name for name in backends.available() if name != "auto"]
    devices = [args.device] if args.device_given else ["cpu", "cuda"]
    header, rows = support_matrix(names, devices)
    print(_markdown(header, rows))
    return 0


# ---------------------------------------------------------------------------------------------
# Formatting and the command line


def _number(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "-" if value is None else str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join(
        "| " + " | ".join(f"{c!s:{w}}" for c, w in zip(line, widths, strict=True)) + " |" for line in lines
    )


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CheckError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CheckError(f"{flag} takes positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m tools.check_backends", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    test = commands.add_parser("test", help="every backend against the reference on a fixed case list")
    test.add_argument("--op", action="append", choices=OPS, help="only this op (repeatable)")
    test.add_argument(
        "--filter",
        help="only cases whose name matches this regular expression (e.g. 'ragged' or 'bias': KV heads "
        "of different lengths, biased entries)",
    )
    perf = commands.add_parser("perf", help="time per op, throughput and peak memory per backend")
    perf.add_argument("--lengths", help="key lengths (memory + chunk), comma-separated")
    perf.add_argument("--chunk", type=int, help="queries per prefill (default: the whole length)")
    perf.add_argument("--head-dim", type=int)
    perf.add_argument("--dtype", choices=sorted(DTYPES))
    perf.add_argument("--heads", type=int, help="query heads")
    perf.add_argument("--kv-heads", type=int)
    perf.add_argument("--batch", type=int, default=1)
    perf.add_argument("--window", type=int, help="sliding window (default: none)")
    perf.add_argument("--last", type=int, default=64, help="rows scored by scores_last (default 64)")
    perf.add_argument("--repeats", type=int, help="timed runs per op (median reported)")
    perf.add_argument(
        "--include-interpreted", action="store_true", help="also time interpreted Triton kernels"
    )
    perf.add_argument("--json", help="also write the numbers to this file")
    support = commands.add_parser("support", help="which backend supports which dtype/head dim/window/stats")
    for command in (test, perf, support):
        command.add_argument("--backend", action="append", help="only this backend (repeatable)")
        command.add_argument(
            "--plugin", action="append", default=[], help="import this module first (repeatable)"
        )
        command.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def _load_plugins(modules: Sequence[str]) -> None:
    for module in modules:
        try:
            load_plugin(module)
        except ValueError as error:
            raise CheckError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.device_given = args.device is not None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    commands = {"test": _test, "perf": _perf, "support": _support}

    def run() -> int:
        _load_plugins(args.plugin)
        if args.command != "support" and args.device.startswith("cuda") and not torch.cuda.is_available():
            raise CheckError(f"--device {args.device}: no CUDA device here; use --device cpu")
        return commands[args.command](args)

    return run_main(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
