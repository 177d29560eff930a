"""Chunked prefill: feed the prompt step by step as a schedule plans it, compressing after each step."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

import policies
import schedules
from engine.attention import POSITION_MODES, AttentionSetup, MemoryAttention, Tap
from engine.cache import KVMemory
from engine.config import ModelConfig
from engine.kv_quant import check_bits
from engine.notices import notice
from engine.peak_memory import begin_step, step_peak
from engine.pod import PodSettings

if TYPE_CHECKING:
    from engine.reform import Reform

PROGRESS_MIN_TOKENS = 1024  # shorter prompts are read too fast for a progress bar to help
NO_POLICY = "none"
FULL_SCHEDULE = "full"
COMPRESSING_SCHEDULE = "imdc"  # what naming a policy without a schedule means
REFORM_POLICY = "h2o"  # REFORM's reading compresses as the paper's does
SPARSE_START_RATIO = 64  # a first step keeping under 1/64 of its chunk gets a note
SCORE_ROWS = 512  # query rows whose attention scores are materialised at once (reference backend)


@dataclass(frozen=True)
class PrefillConfig:
    """How a prompt is prefilled and how much memory it may keep.

    ``policy`` defaults to ``none`` (``h2o`` with ``reform``). ``schedule`` defaults to ``imdc`` when
    a compressing policy is named and to ``full`` (one step, nothing dropped) otherwise; ``full``
    with a compressing policy is refused unless ``decode_memory`` is set (then only generation
    compresses). ``memory`` and ``chunk`` are the
    schedule's M and c in tokens (sinks not counted); ``sinks`` first tokens are never evicted;
    ``positions`` is "compact" (renumber every step: any length fits the model's window) or
    "original". ``decode_memory`` bounds the memory during generation as well. ``query_window`` > 0
    makes compression query-aware: the prompt's last ``query_window`` tokens (the question) are also
    run after every earlier chunk, and policies score with their attention. ``reform`` (an
    ``engine.reform.Reform``) reads with this memory but answers from an exact cache recomputed over
    the tokens gathered for each question (see ``engine.reform``). ``kv_bits`` (2, 3, 4 or 8) stores
    the memory's keys and values quantized (``engine.kv_quant``): about 2-8x more tokens per byte.
    ``memory_bytes`` gives the budget in bytes instead: the model turns it into the most tokens whose
    entries (sinks included, at ``kv_bits``) fit, replacing ``memory`` (``LLM.sized``). ``pod``
    (options of ``engine.pod.PodSettings``, ``{}`` for its defaults) shares distant keys across layers
    as POD does, over full attention's memory.
    """

    schedule: str | None = None
    policy: str | None = None
    memory: int = 1024
    chunk: int = 1024
    sinks: int = 4
    positions: str = "compact"
    policy_args: Mapping[str, Any] = field(default_factory=dict)
    schedule_args: Mapping[str, Any] = field(default_factory=dict)
    decode_memory: int | None = None
    query_window: int = 0
    reform: Reform | None = None
    kv_bits: int | None = None
    memory_bytes: int | None = None
    pod: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        from engine.reform import Reform

        if self.kv_bits is not None:
            check_bits(self.kv_bits)
        size = self.memory_bytes
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"memory_bytes must be a positive number of bytes, got {self.memory_bytes!r}")

        if self.reform is not None and not isinstance(self.reform, Reform):
            raise ValueError(f"reform must be an engine.reform.Reform, got {self.reform!r}")
        if self.policy is None:
            object.__setattr__(self, "policy", REFORM_POLICY if self.reform is not None else NO_POLICY)
        for name in ("memory", "chunk", "sinks", "query_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "chunk" else 0):
                kind = "a positive" if name == "chunk" else "a non-negative"
                raise ValueError(f"{name} must be {kind} number of tokens, got {value!r}")
        if self.decode_memory is not None and (
            not isinstance(self.decode_memory, int) or self.decode_memory < 0
        ):
            raise ValueError(
                f"decode_memory must be a non-negative number of tokens, got {self.decode_memory!r}"
            )
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        compressing = self.policy != NO_POLICY
        if self.schedule is None:
            object.__setattr__(self, "schedule", COMPRESSING_SCHEDULE if compressing else FULL_SCHEDULE)
        if self.schedule == FULL_SCHEDULE and compressing and self.decode_memory is None:
            raise ValueError(
                f"schedule 'full' keeps every token, so policy {self.policy!r} would never run: choose a "
                "compressing schedule (--schedule fixed, im or imdc; imdc when none is given) or set a "
                "decode memory to compress only while generating"
            )
        self.build_schedule()
        if self.pod is not None:
            self.pod_settings()
            if compressing or self.reform is not None or self.kv_bits is not None or self.memory_bytes:
                raise ValueError(
                    "POD shares distant keys over full attention's memory here: a bounded memory with it "
                    "(a policy, REFORM, kv_bits or a byte budget) is not built yet; drop one of them"
                )
        demotes_to = self.build_policy().low_bits
        if self.kv_bits is not None and demotes_to is not None:
            raise ValueError(
                f"kv_bits {self.kv_bits} stores the whole memory quantized, while policy {self.policy!r} "
                f"keeps a full-precision tier and demotes to {demotes_to} bits: give one of them"
            )

    def build_schedule(self) -> schedules.Schedule:
        return schedules.get(self.schedule, memory=self.memory, chunk=self.chunk, **self.schedule_args)

    def build_policy(self) -> policies.Policy:
        return policies.get(self.policy, **self.policy_args)

    def pod_settings(self) -> PodSettings | None:
        return None if self.pod is None else PodSettings.of(self.pod)

    def plan(self, length: int, *, held: int | None = None) -> list[schedules.Step]:
        """The steps for ``length`` new tokens fed to a new memory (``held`` None) or to one that
        already holds ``held`` tokens beyond its sinks.

        A later turn no longer than a chunk is appended without eviction while the
        memory stays within M + c, the span the schedule attends anyway: a question asked after a
        document is read, then answered, over the compressed document (as kvpress evaluates). A
        longer turn is read like a document, and its steps never squeeze the memory below M: growth
        shapes only make sense from an empty memory.
        """
        steps = self.build_schedule().plan(length)
        if held is None:
            _warn_if_sparse_start(self, steps)
            return steps
        if length <= self.chunk and held + length <= self.memory + self.chunk:
            return [schedules.Step(length, None)] if length else []
        return [
            schedules.Step(step.chunk, None if step.memory is None else max(step.memory, self.memory))
            for step in steps
        ]


def _warn_if_sparse_start(config: PrefillConfig, steps: list[schedules.Step]) -> None:
    """A growing schedule over a prompt of many more steps than M/c keeps almost nothing early on."""
    first = steps[0] if len(steps) > 1 else None
    if first is None or first.memory is None or first.memory * SPARSE_START_RATIO >= first.chunk:
        return
    notice(
        f"{config.schedule} keeps only {first.memory} of the first {first.chunk} tokens ({len(steps)} steps "
        f"growing to M={config.memory}): early text is nearly all dropped; a larger --memory or the "
        "'fixed' schedule keeps more of it",
        key=f"sparse-start-{config.schedule}",
    )


def prefill_bytes(config: ModelConfig, memory: KVMemory, plan: list[schedules.Step], states: int) -> int:
    """About the most memory reading ``plan`` into ``memory`` needs at once: the KV entries of its
    widest step (what the memory holds, plus sinks, plus the schedule's peak span) and the
    activations and one tile of attention scores of its largest chunk."""
    if not plan:
        return 0
    widest = memory.longest + memory.sinks + schedules.peak_span(plan)
    chunk = max(step.chunk for step in plan)
    element = memory.layers[0].dtype.itemsize
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_token = 4 * config.hidden_size + 2 * (q_size + 2 * kv_size) + 3 * config.intermediate_size
    scores = min(chunk, SCORE_ROWS) * widest * config.num_heads * 4 * 2
    return memory.bytes_per_token(states) * widest + chunk * per_token * element + scores


@dataclass(frozen=True)
class StepStats:
    index: int
    chunk: int  # new prompt tokens fed
    memory: int  # tokens kept afterwards, sinks excluded (the largest layer)
    seconds: float
    peak_bytes: int  # CUDA allocator peak, or the process's peak RSS on the CPU


@dataclass
class PrefillResult:
    memory: KVMemory
    logits: (
        torch.Tensor | None
    )  # [B, V] of the last token, [B, L, V] with all_logits, None after an early exit
    steps: list[StepStats]

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)


@torch.inference_mode()
def run_prefill(
    model: nn.Module,
    memory: KVMemory,
    ids: torch.Tensor,
    plan: list[schedules.Step],
    setup: AttentionSetup,
    *,
    query_window: int = 0,
    all_logits: bool = False,
    progress: bool = False,
    cancel: threading.Event | None = None,
    layers: int | None = None,
    tap: Tap | None = None,
) -> PrefillResult:
    """Feed ``ids`` [B, L] into ``memory`` step by step; the attention callback compresses each layer.

    With ``query_window``, every step that ends before the question (the last ``query_window``
    tokens) feeds the question after its chunk as observers; steps holding part of it observe with
    those rows. Setting ``cancel`` stops the prefill within a layer with ``PrefillCancelled``,
    leaving ``memory`` part-way through a step (``LLM.prefill`` puts it back). ``layers`` runs only
    the first layers of the model (no logits: REFORM's reading); ``tap`` sees each layer's q, k, v.
    """
    device = ids.device
    length = ids.shape[1]
    question_start = length - min(query_window, length)
    question = ids[:, question_start:]
    steps: list[StepStats] = []
    logits = []
    offset = 0
    quiet = not progress or length < PROGRESS_MIN_TOKENS
    with tqdm(total=length, desc="prefill", unit="tok", disable=quiet, leave=False) as bar:
        for index, step in enumerate(plan):
            begin_step(device)
            started = time.perf_counter()
            end = offset + step.chunk
            tokens = ids[:, offset:end]
            observers, rows = None, None
            if query_window and end <= question_start:
                observers = torch.arange(question_start, length, device=device) + memory.seen - offset
                tokens = torch.cat((tokens, question), dim=1)
                rows = question.shape[1]
            elif query_window:
                rows = end - max(offset, question_start)
            attend = MemoryAttention(
                memory, setup, budget=step.memory, step=index, observers=observers, query_rows=rows,
                cancel=cancel, tap=tap,
            )  # fmt: skip
            logits.append(model(tokens, attend, all_logits=all_logits, layers=layers))
            memory.seen += step.chunk
            offset = end
            peak = step_peak(device)  # waits for the device, so the step's time is complete
            steps.append(StepStats(index, step.chunk, memory.kept(), time.perf_counter() - started, peak))
            bar.update(step.chunk)
            bar.set_postfix(memory=memory.kept())
    memory.trim()  # the room a next chunk would have needed: decode needs far less
    if layers is not None:
        return PrefillResult(memory, None, steps)
    return PrefillResult(memory, torch.cat(logits, dim=1) if all_logits else logits[-1], steps)
