"""A conversation over one KV memory: each turn's new text is prefilled against what the memory holds.

The memory is never rebuilt between turns (after a long document it is compressed and can't be). The
new tokens of a turn are the rendered conversation minus the text the memory already holds, which
works for templates that render a conversation's prefix the same way whatever follows (ChatML,
Llama, Mistral do). When a template doesn't, the conversation is prefilled again from the start.

With ``PrefillConfig(reform=...)`` the document is read once by REFORM's first phase, and every turn
gathers the document tokens that matter to its own question and recomputes an exact cache over them,
followed by the conversation so far (``engine.reform``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from engine import reform
from engine.attention import PrefillCancelled
from engine.generate import Sampling
from engine.llm import LLM, Completion
from engine.notices import notice
from engine.prefill import PrefillConfig, PrefillResult

# Marks where the document ends inside the first user message when rendering the document alone.
_DOCUMENT_END = "\x00document-end\x00"


class ChatSession:
    def __init__(
        self,
        llm: LLM,
        *,
        prefill: PrefillConfig | None = None,
        sampling: Sampling | None = None,
        system_prompt: str | None = None,
        document: str | None = None,
        query_aware: bool = False,
    ) -> None:
        """``query_aware``: read the document together with the first question, so that compression
        scores tokens by that question's attention (otherwise the document is compressed before any
        question is known)."""
        self.llm = llm
        self.query_aware = query_aware
        self.prefill_config = prefill or PrefillConfig()
        self.reform = self.prefill_config.reform
        if self.reform is not None and document is None:
            raise ValueError(
                "REFORM gathers from a document: give one (-f FILE, or ChatSession(document=...))"
            )
        if self.reform is not None and query_aware:
            raise ValueError("REFORM gathers by each question itself: --query-aware does not apply to it")
        self.sampling = sampling or Sampling()
        self.system_prompt = system_prompt
        self.document = document
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the document, if any, is read again on the next turn)."""
        self.messages: list[dict[str, str]] = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self.memory = None
        self.memory_text = ""  # the rendered text whose tokens the memory holds
        self.history: list[int] = []  # those tokens
        self.turns: list[Completion] = []
        self.document_prefill: PrefillResult | None = None
        self.reading: reform.Reading | None = None  # REFORM's first phase
        self.conversation: list[int] = []  # REFORM: the tokens after the document, turns and answers

    def read_document(
        self, *, progress: bool = True, cancel: threading.Event | None = None
    ) -> PrefillResult | None:
        """Prefill the document (the start of the first user message) before any question is asked.

        Setting ``cancel`` stops it with ``PrefillCancelled``; the document is then read again with
        the first question."""
        if self.document is None or self.memory is not None or self.reading is not None:
            return None
        prefix = self.document_prefix()
        ids = self.llm.tokenizer.encode_rendered(prefix)
        if self.reform is None:
            self.document_prefill = self._feed(prefix, ids, progress, cancel=cancel)
            return self.document_prefill
        self.reading = reform.read(
            self.llm, ids, self.prefill_config, self.reform, progress=progress, cancel=cancel
        )
        self.document_prefill = PrefillResult(self.reading.memory, None, self.reading.steps)
        self.memory_text, self.history = prefix, ids
        return self.document_prefill

    def document_tokens(self) -> int:
        """Tokens of the document text itself (without the chat template around it)."""
        return len(self.llm.tokenizer.encode(self.document or "", add_special=False))

    def ask(
        self,
        text: str,
        *,
        max_tokens: int | None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        ignore_eos: bool = False,
        progress: bool = True,
    ) -> Completion:
        """Answer the next user message; the answer joins the conversation even when cancelled.

        ``cancel`` set while the message (or the document) is read raises ``PrefillCancelled`` and
        leaves the conversation exactly as it was before this message.
        """
        tokenizer = self.llm.tokenizer
        first_with_document = self.document is not None and not self.turns
        read_now = first_with_document and self.memory is None and self.reading is None
        if first_with_document:
            if not self.query_aware:
                self.read_document(progress=progress, cancel=cancel)
            text = f"{self.document}\n\n{text}"
        messages = [*self.messages, {"role": "user", "content": text}]
        target = tokenizer.render_chat(messages, add_generation_prompt=True)
        stats = None
        if self.reform is not None:
            result, held, stats, delta = self._gather(target, read_now, cancel)
        else:
            result, held = self._continue(target, first_with_document, progress, cancel), self.history
        completion = self.llm.complete(
            result, held, prefill=self.prefill_config, sampling=self.sampling, max_tokens=max_tokens,
            on_text=on_text, cancel=cancel, ignore_eos=ignore_eos,
        )  # fmt: skip
        completion.reform = stats
        if self.reform is not None:
            self.memory, self.memory_text = result.memory, self.memory_text + delta
            self.conversation += tokenizer.encode(delta, add_special=False) + completion.token_ids
            self.history = held
        self.history = [*self.history, *completion.token_ids]
        self.memory_text += tokenizer.decode(completion.token_ids, skip_special=False)
        self.messages = [*messages, {"role": "assistant", "content": completion.text}]
        self.turns.append(completion)
        return completion

    def _continue(
        self, target: str, first_with_document: bool, progress: bool, cancel: threading.Event | None
    ) -> PrefillResult:
        """Prefill what the memory lacks of ``target``: the new text, or everything when the template
        rendered earlier turns differently."""
        tokenizer = self.llm.tokenizer
        if self.memory is not None and target.startswith(self.memory_text):
            delta = target[len(self.memory_text) :]
            return self._feed(delta, tokenizer.encode(delta, add_special=False), progress, cancel=cancel)
        before = self.memory, self.memory_text, self.history
        if self.memory is not None:
            notice("the chat template re-renders earlier turns; reading the conversation again")
            self.memory, self.memory_text, self.history = None, "", []
        ids = tokenizer.encode_rendered(target)
        question = 0
        if first_with_document and self.query_aware:
            # Everything after the document: the question and the template's closing tokens.
            question = len(ids) - len(tokenizer.encode_rendered(self.document_prefix()))
        try:
            return self._feed(target, ids, progress, query_window=question, cancel=cancel)
        except PrefillCancelled:
            self.memory, self.memory_text, self.history = before
            raise

    def _gather(
        self, target: str, read_now: bool, cancel: threading.Event | None
    ) -> tuple[PrefillResult, list[int], reform.ReformStats, str]:
        """REFORM's second phase for this turn: gather by the turn's own tokens, recompute the
        gathered document with the conversation after it. Returns the prefill, the tokens it holds,
        the phase's numbers and the turn's new text."""
        if not target.startswith(self.memory_text):
            raise ValueError("the chat template re-renders earlier turns, which REFORM cannot follow")
        delta = target[len(self.memory_text) :]
        question = self.llm.tokenizer.encode(delta, add_special=False)
        result, held, stats = reform.answer(
            self.llm, self.reading, self.conversation + question, question, self.reform,
            read_seconds=self.reading.seconds if read_now else 0.0, cancel=cancel,
        )  # fmt: skip
        return result, held, stats, delta

    def document_prefix(self) -> str:
        """The rendered conversation up to the end of the document (the start of the first message)."""
        first = {"role": "user", "content": self.document + _DOCUMENT_END}
        rendered = self.llm.tokenizer.render_chat([*self.messages, first], add_generation_prompt=False)
        return rendered[: rendered.index(_DOCUMENT_END)]

    def _feed(
        self,
        text: str,
        ids: list[int],
        progress: bool,
        *,
        query_window: int = 0,
        cancel: threading.Event | None = None,
    ) -> PrefillResult:
        config = self.prefill_config
        if query_window:
            config = replace(config, query_window=query_window)
        result = self.llm.prefill(ids, config, memory=self.memory, progress=progress, cancel=cancel)
        self.memory = result.memory
        self.memory_text += text
        self.history += ids
        return result
