"""``LLM``: a loaded checkpoint with its tokenizer, and the prefill / generate / chat entry points."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import backends
import schedules
from engine import calibration, gguf, reform
from engine.attention import AttentionSetup, MemoryAttention, PrefillCancelled, Tap
from engine.cache import KVMemory
from engine.checkpoint import DTYPES, load_gguf, load_model
from engine.config import ModelConfig
from engine.generate import Sampler, Sampling, generate_tokens
from engine.peak_memory import require_available
from engine.pod import PodSettings, plan_for
from engine.prefill import PrefillConfig, PrefillResult, prefill_bytes, run_prefill
from engine.reform import ReformStats
from engine.tokenizer import Tokenizer, load_tokenizer, tokenizer_from
from models.quantized import FORMATS as QUANTIZED_FORMATS
from models.rope import Rope
from policies import ModelFacts, Policy


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop", "length" or "cancelled"
    prompt_tokens: int
    prefill: PrefillResult
    decode_seconds: float
    reform: ReformStats | None = None  # REFORM's two phases, when the answer came from a gathered cache

    @property
    def memory(self) -> KVMemory:
        """The memory after the answer: prompt (compressed) and every generated token."""
        return self.prefill.memory


class LLM:
    def __init__(
        self,
        path: Path,
        config: ModelConfig,
        model: nn.Module,
        tokenizer: Tokenizer | None,
        *,
        backend: str = "auto",
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.path, self.config, self.model, self.tokenizer = path, config, model, tokenizer
        self.backend, self.device, self.dtype = backend, device, dtype
        self.rope = Rope(config.head_dim, config.rope, device)
        self._resolved: dict[backends.AttentionSpec, backends.Backend] = {}
        self._calibration: tuple[dict, Path] | None = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = list(self.config.eos_token_ids)
        if self.tokenizer.eos_id is not None and self.tokenizer.eos_id not in ids:
            ids.append(self.tokenizer.eos_id)
        return tuple(ids)

    def new_memory(self, config: PrefillConfig | None = None) -> KVMemory:
        """An empty memory for prefills by ``config``: its sinks, its ``kv_bits``, and the low tier its
        policy demotes to (``low_bits``)."""
        c, prefill = self.config, config or PrefillConfig()
        return KVMemory(
            c.num_layers, c.num_kv_heads, c.head_dim,
            sinks=prefill.sinks, dtype=self.dtype, device=self.device, kv_bits=prefill.kv_bits,
            low_bits=prefill.build_policy().low_bits,
        )  # fmt: skip

    def attention_setup(
        self, policy: Policy, positions: str = "compact", pod: PodSettings | None = None
    ) -> AttentionSetup:
        """What a prefill or generation with ``policy`` (and ``pod``) runs with: the policy prepared for
        this model (its calibration read), and the backend resolved for what they ask of attention."""
        policy.prepare(self.model_facts())
        plan = None if pod is None else plan_for(self, pod)
        spec = backends.AttentionSpec(
            head_dim=self.config.head_dim,
            group=self.config.group,
            dtype=self.dtype,
            device=self.device.type,
            window=self.model.sliding_window,
            stats=policy.needs.queries is not None,
            segments=policy.head_wise,
            bias=policy.merges,
            query_head_stats=policy.needs.by_query_head,
            distant=plan is not None,
        )
        if spec not in self._resolved:
            self._resolved[spec] = backends.resolve(self.backend, spec)
        return AttentionSetup(
            self.rope,
            self._resolved[spec],
            policy,
            positions,
            self.model.sliding_window,
            self.config.num_layers,
            plan,
        )

    def model_facts(self) -> ModelFacts:
        c = self.config
        return ModelFacts(
            c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, self.calibration,
            calibration.make_command(self),
        )  # fmt: skip

    def calibration(self, name: str) -> dict:
        """Section ``name`` of this model's calibration file (``python -m tools.find_heads``)."""
        if self._calibration is None:
            self._calibration = calibration.find(self)
        data, path = self._calibration
        return calibration.section(data, name, path, self)

    def sized(self, config: PrefillConfig) -> PrefillConfig:
        """``config`` with its byte budget (``memory_bytes``) turned into tokens of this model: the most
        whose entries, sinks included, fit in it between steps (a step briefly holds a chunk more)."""
        if config.memory_bytes is None:
            return config
        policy = config.build_policy()
        memory = self.new_memory(config)
        states = len(policy.state) + policy.merges
        per_token = memory.bytes_per_token(states)
        # A demoting policy's budget is mixed: its full-precision share at per_token, the rest lower.
        mixed = policy.high_share * per_token
        if memory.low_bits is not None:
            mixed += (1 - policy.high_share) * memory.bytes_per_token(states, low=True)
        tokens = int((config.memory_bytes - config.sinks * per_token) // mixed)
        if tokens < 1:
            raise ValueError(
                f"a memory of {config.memory_bytes} bytes holds {config.memory_bytes // per_token} tokens of "
                f"this model ({per_token} bytes each, all layers), not even the {config.sinks} sinks and one "
                f"more: give at least {(config.sinks + 1) * per_token} bytes, or quantize it (kv bits)"
            )
        return replace(config, memory=tokens, memory_bytes=None)

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Full-attention float32 logits for every position [len(ids), vocab]."""
        tokens = self._tensor(ids)
        setup = self.attention_setup(PrefillConfig().build_policy())
        plan = [schedules.Step(tokens.shape[1], None)]
        memory = self.new_memory(PrefillConfig(sinks=0))
        return run_prefill(self.model, memory, tokens, plan, setup, all_logits=True).logits[0]

    def prefill(
        self,
        ids: Sequence[int],
        config: PrefillConfig | None = None,
        *,
        memory: KVMemory | None = None,
        progress: bool = False,
        cancel: threading.Event | None = None,
        layers: int | None = None,
        tap: Tap | None = None,
    ) -> PrefillResult:
        """Feed ``ids`` into ``memory`` (a new one if None) by ``config``'s schedule and policy.

        Setting ``cancel`` stops the prefill within about a layer's time with ``PrefillCancelled``;
        a given ``memory`` is then put back as it was before the call. ``layers`` runs only the first
        layers (no logits), ``tap`` sees every layer's pre-RoPE q, k, v (both for REFORM's reading).
        """
        config = self.sized(config or PrefillConfig())
        held = memory.kept() if memory is not None and memory.seen > 0 else None
        memory = memory if memory is not None else self.new_memory(config)
        tokens = self._tensor(ids)
        policy = config.build_policy()
        setup = self.attention_setup(policy, config.positions, config.pod_settings())
        plan = config.plan(tokens.shape[1], held=held)
        require_available(
            prefill_bytes(self.config, memory, plan, len(policy.state)),
            self.device,
            f"reading {tokens.shape[1]} tokens with schedule {config.schedule}",
            "bound the memory, e.g. --schedule imdc --policy snapkv --memory 1024 --chunk 1024"
            if config.schedule == "full"
            else "use a smaller --memory or --chunk",
        )
        restore = memory.rollback_point(appending_only=all(step.memory is None for step in plan))
        try:
            return run_prefill(
                self.model, memory, tokens, plan, setup,
                query_window=config.query_window, progress=progress, cancel=cancel, layers=layers, tap=tap,
            )  # fmt: skip
        except PrefillCancelled:
            restore()
            raise

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        prefill: PrefillConfig | None = None,
        sampling: Sampling | None = None,
        max_tokens: int | None = 256,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        ignore_eos: bool = False,
        progress: bool = False,
    ) -> Completion:
        """Complete ``prompt`` (text, encoded as the tokenizer does, or token ids) without a chat template.

        ``max_tokens``: at most this many tokens; None or a negative number generates until an
        end-of-sequence token, a ``stop`` string or ``cancel`` (as ``-n -1`` does on the command line).
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stats = None
        if prefill is not None and prefill.reform is not None:
            # REFORM over one prompt: its last ``query`` tokens are the question, as in the paper.
            reading = reform.read(self, ids, prefill, prefill.reform, progress=progress, cancel=cancel)
            result, ids, stats = reform.answer(
                self, reading, [], [], prefill.reform, read_seconds=reading.seconds, cancel=cancel
            )
        else:
            result = self.prefill(ids, prefill, progress=progress, cancel=cancel)
        completion = self.complete(
            result, ids, prefill=prefill, sampling=sampling, max_tokens=max_tokens, stop=stop,
            on_text=on_text, cancel=cancel, ignore_eos=ignore_eos,
        )  # fmt: skip
        completion.reform = stats
        return completion

    def chat(self, messages: Sequence[dict[str, str]], **options) -> Completion:
        """Answer a conversation (``[{"role": ..., "content": ...}, ...]``) rendered by the chat template."""
        return self.generate(self.tokenizer.encode_chat(messages), **options)

    def complete(
        self,
        result: PrefillResult,
        history: Sequence[int],
        *,
        prefill: PrefillConfig | None = None,
        sampling: Sampling | None = None,
        max_tokens: int | None = 256,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        ignore_eos: bool = False,
    ) -> Completion:
        """Generate after a prefill, appending every generated token to ``result.memory``."""
        config = prefill or PrefillConfig()
        if config.reform is not None:  # the recomputed cache is exact: generation keeps all of it
            config = PrefillConfig(positions=config.positions)
        memory = result.memory
        setup = self.attention_setup(config.build_policy(), config.positions, config.pod_settings())
        slack = None if config.decode_memory is None else max(16, config.decode_memory // 8)

        @torch.inference_mode()
        def step(token: int) -> torch.Tensor:
            # Compress back to the decode budget only once it is exceeded by ``slack`` tokens.
            due = config.decode_memory is not None and memory.kept() >= config.decode_memory + slack
            attend = MemoryAttention(
                memory, setup, budget=config.decode_memory if due else None, step=memory.seen
            )
            logits = self.model(self._tensor([token]), attend)
            memory.seen += 1
            return logits[0]

        started = time.perf_counter()
        generated = generate_tokens(
            step, result.logits[0], Sampler(sampling or Sampling()), self.tokenizer.stream_decoder(),
            history=history, max_tokens=max_tokens, eos_ids=() if ignore_eos else self.eos_ids, stop=stop,
            on_text=on_text,
            cancel=cancel,
        )  # fmt: skip
        return Completion(
            generated.text, generated.token_ids, generated.finish_reason, len(history), result,
            time.perf_counter() - started,
        )  # fmt: skip

    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        if len(ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        try:
            tokens = torch.tensor([list(ids)], dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"token ids must be integers, got {list(ids)[:8]!r}") from None
        vocabulary = self.config.vocab_size
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocabulary:
            raise ValueError(
                f"token id {low if low < 0 else high} is outside the model's vocabulary of {vocabulary} "
                f"(ids 0..{vocabulary - 1})"
            )
        return tokens.to(self.device)


def load(
    model: str | Path | None = None,
    *,
    backend: str = "auto",
    dtype: str | torch.dtype | None = None,
    weight_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    chat_template: str | None = None,
) -> LLM:
    """Load a checkpoint directory (the default model when ``model`` is None) into an ``LLM``.

    ``dtype``: the activations' (default: the checkpoint's). ``weight_dtype``: how embedding and
    linear weights are stored (default: ``dtype``); float16 gives 1.5-2.7x faster CPU decode for a
    small loss of accuracy; "int8" and "int4" store them weight-only quantized (CPU only).
    """
    from engine.default_model import default_model_dir

    if backend not in backends.available():
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(backends.available())}")
    dtype, weight_dtype = parse_dtype(dtype, "dtype"), parse_weight_format(weight_dtype)
    device = parse_device(device)
    backends.prepare_triton()  # before the model is built: building it may import triton
    path = Path(model) if model is not None else default_model_dir()
    if path.is_file() and path.suffix.lower() == ".gguf":  # read directly, its quantization kept
        checkpoint = gguf.read(path)
        config, module = load_gguf(checkpoint, dtype=dtype, weight_dtype=weight_dtype, device=device)
        tokenizer = tokenizer_from(
            checkpoint.tokenizer, checkpoint.tokenizer_config, chat_template=chat_template
        )
    else:
        config, module = load_model(path, dtype=dtype, weight_dtype=weight_dtype, device=device)
        tokenizer = load_tokenizer(path, chat_template=chat_template)
    activations = module.model.norm.weight.dtype
    return LLM(path, config, module, tokenizer, backend=backend, device=device, dtype=activations)


def parse_device(value: str | torch.device | None) -> torch.device:
    """The device named (None: cuda when available, else cpu), refused clearly when it can't be used."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {value!r}; use cpu or cuda (cuda:N for the N-th GPU)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {value!r} is not supported; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {value!r}: {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {value!r}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def parse_weight_format(value: str | torch.dtype | None) -> torch.dtype | str | None:
    """How weights are stored: a float dtype (by name or alias), "int8" or "int4"."""
    if value in QUANTIZED_FORMATS:
        return value
    try:
        return parse_dtype(value, "weight dtype")
    except ValueError:
        raise ValueError(
            f"unknown weight dtype {value!r}; use one of {', '.join([*DTYPES, *QUANTIZED_FORMATS])}"
        ) from None


def parse_dtype(value: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """A torch dtype from a name such as "float16" or "bf16" (None and dtypes pass through)."""
    if not isinstance(value, str):
        return value
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(value, value)
    if name not in DTYPES:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
