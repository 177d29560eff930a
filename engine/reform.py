"""REFORM (Song et al., "Compress, Gather, and Recompute", NeurIPS 2025): read a document with a
bounded, compressed memory; answer every question from an exact cache recomputed over the tokens
that matter to it.

Reading (phase 1) is the engine's chunked prefill, under any schedule and policy (``h2o`` by default,
as in the paper), with two additions: the forward pass exits after the highest layer holding an
embedding head, so the layers above it and the LM head never run; and for every token the pre-RoPE
query, key or value vectors of a few calibrated heads (``tools.find_heads``) are L2-normalised,
concatenated and kept in float16, with the token ids. Taken before RoPE, a token's embedding does not
depend on the position compression gave it.

Answering (phase 2), for every question: the question is run through the same layers over the reading
memory and embedded the same way; each document token scores its highest cosine similarity to a
question token; the scores are max-pooled along the document (``pool`` wide) so that whole spans are
taken; the best tokens and the document's first ``prefix`` and last ``suffix`` tokens, ``gather`` in
all, are taken in their original order and an exact cache is recomputed over them with every layer at
positions 0..G-1. The question (and the conversation so far) follows on that cache. A document no
longer than ``gather`` is taken whole: that is exact full attention.

Parameters (paper's values where it gives them): ``gather`` tokens recomputed, the window less
``reserve`` (room for the conversation) by default; ``pool`` 129; ``prefix``/``suffix`` 256; ``heads``
a calibration file (default: the checkpoint's own, or the one shipped for the model); ``query`` the
final tokens taken as the question when a single prompt is given (``LLM.generate``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.attention import Tap
from engine.cache import KVMemory
from engine.calibration import CalibrationError, find, section
from engine.prefill import PrefillConfig, PrefillResult, StepStats

if TYPE_CHECKING:
    from engine.llm import LLM

KINDS = ("q", "k", "v")
SCORE_ROWS = 16384  # document tokens scored against the question at once


@dataclass(frozen=True)
class Reform:
    gather: int | None = None
    pool: int = 129
    prefix: int = 256
    suffix: int = 256
    reserve: int = 1024
    heads: str | None = None
    query: int = 64

    def __post_init__(self) -> None:
        for name in ("pool", "query"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"reform {name} must be a positive whole number, got {value!r}")
        if self.pool % 2 == 0:
            raise ValueError(f"reform pool must be odd (a window centred on each token), got {self.pool}")
        for name in ("prefix", "suffix", "reserve"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"reform {name} must be a non-negative number of tokens, got {value!r}")
        if self.gather is not None and (
            isinstance(self.gather, bool)
            or not isinstance(self.gather, int)
            or self.gather <= self.prefix + self.suffix
        ):
            raise ValueError(
                f"reform gather={self.gather!r} must be a number of tokens larger than prefix + suffix "
                f"({self.prefix} + {self.suffix}): it counts them"
            )

    def gather_size(self, window: int) -> int:
        """Tokens recomputed for a question: ``gather``, or the model's window less ``reserve``."""
        size = self.gather if self.gather is not None else window - self.reserve
        if size <= self.prefix + self.suffix:
            raise ValueError(
                f"reform: the {window}-token window less reserve={self.reserve} leaves {size} tokens, "
                f"not more than prefix + suffix ({self.prefix} + {self.suffix}); lower one of them"
            )
        return size


@dataclass(frozen=True)
class EmbeddingHeads:
    """The (layer, kind, head) whose pre-RoPE states make a token's embedding, in that order."""

    heads: tuple[tuple[int, str, int], ...]
    head_dim: int

    @property
    def exit_layer(self) -> int:
        return max(layer for layer, _, _ in self.heads)

    @property
    def width(self) -> int:
        return len(self.heads) * self.head_dim

    def writer(self, store: torch.Tensor, offset: int) -> Tap:
        """A tap writing the embedding of the token at original position p into ``store[p - offset]``."""

        def tap(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
            states = {"q": q, "k": k, "v": v}
            for slot, (at, kind, head) in enumerate(self.heads):
                if at == layer:
                    vectors = F.normalize(states[kind][0, head].float(), dim=-1)
                    rows = slice(start - offset, start - offset + vectors.shape[0])
                    store[rows, slot * self.head_dim : (slot + 1) * self.head_dim] = vectors.to(store.dtype)

        return tap


def embedding_heads(llm: LLM, reform: Reform) -> EmbeddingHeads:
    """The embedding heads of ``llm``'s calibration file, checked against the model."""
    data, path = find(llm, reform.heads)
    part = section(data, "reform", path, llm)
    config = llm.config
    heads = []
    for entry in part.get("heads", []):
        layer, kind, head = entry
        count = config.num_heads if kind == "q" else config.num_kv_heads
        if kind not in KINDS or not 0 <= layer < config.num_layers or not 0 <= head < count:
            raise CalibrationError(f"{path}: embedding head {entry} does not exist in this model")
        heads.append((int(layer), str(kind), int(head)))
    if not heads:
        raise CalibrationError(f"{path} lists no REFORM embedding heads; remake it with tools.find_heads")
    return EmbeddingHeads(tuple(heads), config.head_dim)


@dataclass
class Reading:
    """What phase 1 leaves: the document's ids and embeddings, and the early layers' memory."""

    ids: list[int]
    embeddings: torch.Tensor  # [L, heads x head_dim] float16, unit vectors per head
    memory: KVMemory  # layers up to the exit layer, compressed by the reading's schedule and policy
    config: PrefillConfig
    heads: EmbeddingHeads
    steps: list[StepStats]

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    @property
    def embedding_bytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


@dataclass(frozen=True)
class ReformStats:
    """One answer's two phases, for ``/stats`` and the benchmarks."""

    document_tokens: int
    read_seconds: float  # phase 1 (0 when the document was read for an earlier question)
    read_layers: int  # layers run while reading
    read_memory_bytes: int
    embedding_bytes: int
    question_tokens: int
    gathered: int  # document tokens recomputed
    gather_seconds: float  # embedding the question, scoring, choosing
    recompute_seconds: float  # the exact cache over the gathered tokens and the conversation


def read(
    llm: LLM,
    ids: Sequence[int],
    config: PrefillConfig,
    reform: Reform,
    *,
    progress: bool = False,
    cancel: threading.Event | None = None,
    early_exit: bool = True,
) -> Reading:
    """Phase 1: prefill ``ids`` by ``config`` up to the exit layer, keeping every token's embedding
    (``early_exit=False`` runs every layer, to measure what the exit saves)."""
    heads = embedding_heads(llm, reform)
    store = torch.zeros(len(ids), heads.width, dtype=torch.float16, device=llm.device)
    memory = llm.new_memory(config)
    layers = heads.exit_layer + 1 if early_exit else llm.config.num_layers
    result = llm.prefill(
        ids, config, memory=memory, progress=progress, cancel=cancel, layers=layers,
        tap=heads.writer(store, offset=0),
    )  # fmt: skip
    return Reading(list(ids), store, memory, config, heads, result.steps)


def embed_question(llm: LLM, reading: Reading, ids: Sequence[int]) -> torch.Tensor:
    """The question's embeddings, from the early layers over the reading memory, which is left as it was."""
    store = torch.zeros(len(ids), reading.heads.width, dtype=torch.float16, device=llm.device)
    memory = reading.memory
    restore = memory.rollback_point(appending_only=True)
    plain = replace(
        reading.config, schedule="full", policy="none", query_window=0, decode_memory=None, reform=None
    )
    try:
        llm.prefill(
            ids, plain, memory=memory, layers=reading.heads.exit_layer + 1,
            tap=reading.heads.writer(store, offset=memory.seen),
        )  # fmt: skip
    finally:
        restore()
    return store


def choose(embeddings: torch.Tensor, question: torch.Tensor, reform: Reform, size: int) -> torch.Tensor:
    """Indices (sorted) of the ``size`` document tokens to recompute: the first ``prefix`` and last
    ``suffix``, then the best by max-pooled similarity to the question (ties: the earlier token)."""
    length = embeddings.shape[0]
    if length <= size:
        return torch.arange(length, device=embeddings.device)
    scores = torch.empty(length, device=embeddings.device)
    for start in range(0, length, SCORE_ROWS):
        rows = embeddings[start : start + SCORE_ROWS].float()
        scores[start : start + SCORE_ROWS] = (rows @ question.float().T).amax(dim=-1)
    pooled = F.max_pool1d(scores[None, None], reform.pool, stride=1, padding=reform.pool // 2)[0, 0]
    pooled[: reform.prefix] = float("inf")
    pooled[length - reform.suffix :] = float("inf")
    best = torch.sort(pooled, descending=True, stable=True).indices[:size]
    return best.sort().values


def answer(
    llm: LLM,
    reading: Reading,
    conversation: Sequence[int],
    question: Sequence[int],
    reform: Reform,
    *,
    read_seconds: float = 0.0,
    cancel: threading.Event | None = None,
) -> tuple[PrefillResult, list[int], ReformStats]:
    """Phase 2: gather for ``question`` and recompute an exact cache over the gathered document tokens
    followed by ``conversation`` (everything after the document, the question last). ``question``
    empty: the document's own last ``query`` tokens are the question (a single prompt).
    Returns the recomputed prefill, the token ids it holds, and the phase's numbers."""
    started = time.perf_counter()
    embedded = embed_question(llm, reading, question) if question else reading.embeddings[-reform.query :]
    size = reform.gather_size(llm.config.max_position_embeddings)
    index = choose(reading.embeddings, embedded, reform, size)
    ids = [reading.ids[i] for i in index.tolist()] + list(conversation)
    gathered = time.perf_counter()
    result = llm.prefill(ids, PrefillConfig(positions=reading.config.positions), cancel=cancel)
    stats = ReformStats(
        document_tokens=len(reading.ids),
        read_seconds=read_seconds,
        read_layers=reading.heads.exit_layer + 1,
        read_memory_bytes=reading.memory.nbytes,
        embedding_bytes=reading.embedding_bytes,
        question_tokens=len(question) or min(reform.query, len(reading.ids)),
        gathered=len(index),
        gather_seconds=gathered - started,
        recompute_seconds=result.seconds,
    )
    return result, ids, stats
