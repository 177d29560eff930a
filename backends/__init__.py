"""Attention backends: the contract every backend implements, the registry, and the ``auto`` choice.

Shapes (all backends):
    q      [B, Hq, Lq, D]     queries of the current chunk (already rotated)
    k, v   [B, Hkv, Lk, D]    memory + chunk keys and values, Lk >= Lq
Query head h reads KV head h // (Hq // Hkv).
Masking: query i sits at key index i + (Lk - Lq) (the causal diagonal is aligned bottom-right), sees
key j when j <= i + (Lk - Lq), and with a sliding ``window`` W only when i + (Lk - Lq) - j < W.

``bias`` [B, Hkv, Lk] (optional) is added to every scaled score of its key: an entry standing for n
merged tokens carries log n. KV heads of different lengths come as ``Segments`` in place of k (v is
then None): each (batch, KV head) its own Lk, the masking above taken per head. A memory partly
stored as packed codes comes as ``Packed`` in place of k to the ``decode`` of a backend that
``reads_packed``; ``Packed.segments()`` is the same memory dequantized, what every other call gets.
``distant`` (a ``Distant``, to ``prefill`` and ``decode``) gives a second key source for distant keys
(POD's keys shared across layers): scores use it where it says, values are always ``v``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.kv_quant import KVCodec, assemble
from engine.notices import notice
from engine.registry import Registry


class AttentionOutput(NamedTuple):
    out: torch.Tensor  # [B, Hq, Lq, D] in q's dtype
    lse: torch.Tensor | None  # [B, Hq, Lq] float32, natural-log sum of exp(scaled scores) over visible keys


@dataclass
class Segments:
    """Keys and values of KV heads holding different numbers of entries, in flat buffers: segment
    s = b * Hkv + h holds ``lengths[s]`` entries from ``offsets[s]``."""

    keys: torch.Tensor  # [C, D], rotated
    values: torch.Tensor  # [C, D]
    offsets: list[int]
    lengths: list[int]
    shape: tuple[int, int]  # (B, Hkv)
    bias: torch.Tensor | None = None  # [C]

    def __getitem__(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Segment ``s``: keys [n, D], values [n, D], bias [n] or None."""
        rows = slice(self.offsets[s], self.offsets[s] + self.lengths[s])
        return self.keys[rows], self.values[rows], None if self.bias is None else self.bias[rows]

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)


@dataclass
class Packed:
    """A two-tier memory's keys and values as stored (``engine.cache``): flat entries as in
    ``Segments``, entry i being row ``order[i]`` of [low tier; full-precision tier]. The low tier's
    rows are ``bits``-bit codes packed little-end first (``engine.kv_quant``), each with a float16
    scale and zero; its keys were stored multiplied by ``low_balance`` (MiKV's balancer), which a
    reader divides out after dequantizing. A tier may hold rows no entry points at (room for the
    next appends): a reader reads rows through ``order`` only."""

    order: torch.Tensor  # [C] int64
    high_keys: torch.Tensor  # [P, D] rotated
    high_values: torch.Tensor  # [P, D]
    low_keys: torch.Tensor  # [Q, D * bits / 8] uint8
    low_values: torch.Tensor  # [Q, D * bits / 8] uint8
    low_key_params: torch.Tensor  # [Q, 2] float16: scale, zero
    low_value_params: torch.Tensor  # [Q, 2] float16
    low_balance: torch.Tensor  # [Q, D] float32
    bits: int
    offsets: list[int]
    lengths: list[int]
    shape: tuple[int, int]  # (B, Hkv)
    bias: torch.Tensor | None = None  # [C]

    def segments(self) -> Segments:
        """The same memory dequantized, in flat ``Segments`` buffers."""
        codec = KVCodec(self.bits, self.high_keys.shape[1])
        return Segments(
            assemble(codec, self.high_keys, self.low_keys, self.low_key_params, self.order, self.low_balance),
            assemble(codec, self.high_values, self.low_values, self.low_value_params, self.order),
            self.offsets, self.lengths, self.shape, self.bias,
        )  # fmt: skip


@dataclass
class Distant:
    """POD's second key source (``engine.pod``): query row i scores key j against ``keys[..., j, :]``
    (the block leader's rotated key of the same token) in place of k's when j is distant, that is
    when its position is at least ``initial`` and at least ``recent`` before the query's."""

    keys: torch.Tensor  # [B, Hkv, Lk, D], like k
    query_positions: torch.Tensor  # [Lq] int64
    key_positions: torch.Tensor  # [Lk] int64
    initial: int
    recent: int

    def mask(self, rows: slice = slice(None)) -> torch.Tensor:
        """[rows, Lk] bool: where the scores of query ``rows`` come from ``keys``."""
        keys = self.key_positions[None, :]
        return (keys >= self.initial) & (self.query_positions[rows, None] - keys >= self.recent)


class KeyStats(NamedTuple):
    # [B, Hkv, Lk] float32: softmax probability summed over scored queries and the group's heads
    # ([B, Hq, Lk], not summed over heads, when asked ``by_query_head``)
    mass: torch.Tensor
    count: (
        torch.Tensor
    )  # [Lk] int64 ([B, Hkv, Lk] for Segments, left-padded): scored queries that see each key


@dataclass(frozen=True)
class AttentionSpec:
    """What a caller will ask of a backend, so that ``supports`` can say no up front."""

    head_dim: int
    group: int
    dtype: torch.dtype
    device: str  # "cpu", "cuda", ...
    window: int | None = None
    stats: bool = False  # whether ``scores`` will be called
    segments: bool = False  # KV heads of different lengths (``Segments``)
    bias: bool = False  # per-entry logit biases
    query_head_stats: bool = False  # ``scores(by_query_head=True)``
    distant: bool = False  # a second key source for distant keys (``Distant``)

    def describe(self) -> str:
        window = f", window {self.window}" if self.window else ""
        stats = ", with statistics" if self.stats else ""
        segments = ", heads of different lengths" if self.segments else ""
        bias = ", biased entries" if self.bias else ""
        per_head = ", statistics per query head" if self.query_head_stats else ""
        distant = ", distant keys shared across layers" if self.distant else ""
        dtype = str(self.dtype).removeprefix("torch.")
        features = f"{window}{stats}{segments}{bias}{per_head}{distant}"
        return f"head dim {self.head_dim}, GQA group {self.group}, {dtype} on {self.device}{features}"


class Backend:
    """The contract. ``scale`` defaults to 1/sqrt(D); ``out`` lets the caller supply the output buffer.
    ``reads_packed``: ``decode`` takes a ``Packed`` memory and dequantizes it as it reads."""

    name = "abstract"
    reads_packed = False

    def supports(self, spec: AttentionSpec) -> bool:
        return self.lacks(spec) is None

    def lacks(self, spec: AttentionSpec) -> str | None:
        """Why this backend cannot serve ``spec``, in words; None when it can. A backend that
        overrides ``supports`` alone was written for plain memories: it is asked about those, and
        declines heads of different lengths, biased entries and statistics per query head."""
        if type(self).supports is Backend.supports:
            raise NotImplementedError(f"backend {self.name!r} must implement lacks()")
        newer = [
            feature
            for feature, asked in (
                ("heads of different lengths", spec.segments),
                ("biased entries", spec.bias),
                ("statistics per query head", spec.query_head_stats),
                ("distant keys shared across layers", spec.distant),
            )
            if asked
        ]
        if newer:
            return f"it does not say it reads {', '.join(newer)}"
        return None if self.supports(spec) else "it says it does not"

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        window: int | None = None,
        out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        distant: Distant | None = None,
    ) -> AttentionOutput:
        """Causal attention of a chunk's queries against memory + chunk keys, with the per-row LSE."""
        raise NotImplementedError

    def scores(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        lse: torch.Tensor | None = None,
        last: int | None = None,
        scale: float | None = None,
        window: int | None = None,
        out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        by_query_head: bool = False,
    ) -> KeyStats:
        """Per-key attention mass from the last ``last`` queries (all when None), per KV head (summed
        over its group), or per query head [B, Hq, Lk] with ``by_query_head``.

        ``lse`` is the prefill's per-row LSE for all Lq rows; without it the backend recomputes it.
        """
        raise NotImplementedError

    def decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        window: int | None = None,
        out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        distant: Distant | None = None,
    ) -> AttentionOutput:
        """One query row per sequence ([B, Hq, 1, D]) against the whole cache."""
        raise NotImplementedError


def prepare_triton() -> None:
    """Without a GPU, Triton kernels can only run interpreted, and Triton fixes the mode of each
    ``@triton.jit`` function (its own library's included) when it is defined. Torch imports triton
    on its own (building a model on the meta device does), so the entry points that may lead there
    (``engine.load``, the triton backend, the tools' random models) call this first. It sets
    ``TRITON_INTERPRET=1`` when there is no GPU and no explicit choice; importing ``backends`` does
    not. If triton was already imported compiled, the triton backend declines CPU work instead."""
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if not gpu and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"


_registry: Registry[Backend] = Registry("backend", entry_point_group="engine.backends")
register = _registry.register
get = _registry.get
factory = _registry.factory


def available() -> list[str]:
    return ["auto", *_registry.available()]


def resolve(name: str, spec: AttentionSpec) -> Backend:
    """The backend to use for ``spec``: ``auto`` picks the fastest that supports it; a named backend
    that does not support it falls back to ``reference`` with a one-line notice."""
    if name == "auto":
        order = ["triton", "sdpa", "reference"] if spec.device == "cuda" else ["sdpa", "reference"]
        for candidate in order:
            backend = _try_get(candidate)
            if backend is not None and backend.lacks(spec) is None and backend.supports(spec):
                return backend
        return get("reference")
    backend = get(name)
    reason = backend.lacks(spec)
    if reason is None and backend.supports(spec):
        return backend
    why = f" ({reason})" if reason else ""
    notice(f"backend {name!r} does not support {spec.describe()}{why}; using 'reference'")
    return get("reference")


def _try_get(name: str) -> Backend | None:
    try:
        return get(name)
    except ImportError:
        return None


# Built-in backends register themselves on import; triton is imported lazily by its factory.
from backends import reference as _reference  # noqa: E402,F401
from backends import sdpa as _sdpa  # noqa: E402,F401


@register("triton")
def _triton_backend() -> Backend:
    from backends.triton import TritonBackend

    return TritonBackend()
