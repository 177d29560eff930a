"""A conversation over one KV memory: each turn's new text is prefilled against what the memory holds.

The memory is never rebuilt between turns (after a long document it is compressed and can't be). The
new tokens of a turn are the rendered conversation minus the text the memory already holds, which
works for templates that render a conversation's prefix the same way whatever follows (ChatML,
Llama, Mistral do). When a template doesn't, the conversation is prefilled again from the start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

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

    def read_document(
        self, *, progress: bool = True, cancel: threading.Event | None = None
    ) -> PrefillResult | None:
        """Prefill the document (the start of the first user message) before any question is asked.

        Setting ``cancel`` stops it with ``PrefillCancelled``; the document is then read again with
        the first question."""
        if self.document is None or self.memory is not None:
            return None
        prefix = self._document_prefix()
        ids = self.llm.tokenizer.encode_rendered(prefix)
        self.document_prefill = self._feed(prefix, ids, progress, cancel=cancel)
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
        if first_with_document:
            if not self.query_aware:
                self.read_document(progress=progress, cancel=cancel)
            text = f"{self.document}\n\n{text}"
        messages = [*self.messages, {"role": "user", "content": text}]
        target = tokenizer.render_chat(messages, add_generation_prompt=True)
        if self.memory is not None and target.startswith(self.memory_text):
            delta = target[len(self.memory_text) :]
            result = self._feed(delta, tokenizer.encode(delta, add_special=False), progress, cancel=cancel)
        else:
            before = self.memory, self.memory_text, self.history
            if self.memory is not None:
                notice("the chat template re-renders earlier turns; reading the conversation again")
                self.memory, self.memory_text, self.history = None, "", []
            ids = tokenizer.encode_rendered(target)
            question = 0
            if first_with_document and self.query_aware:
                # Everything after the document: the question and the template's closing tokens.
                question = len(ids) - len(tokenizer.encode_rendered(self._document_prefix()))
            try:
                result = self._feed(target, ids, progress, query_window=question, cancel=cancel)
            except PrefillCancelled:
                self.memory, self.memory_text, self.history = before
                raise
        completion = self.llm.complete(
            result, self.history, prefill=self.prefill_config, sampling=self.sampling, max_tokens=max_tokens,
            on_text=on_text, cancel=cancel, ignore_eos=ignore_eos,
        )  # fmt: skip
        self.history += completion.token_ids
        self.memory_text += tokenizer.decode(completion.token_ids, skip_special=False)
        self.messages = [*messages, {"role": "assistant", "content": completion.text}]
        self.turns.append(completion)
        return completion

    def _document_prefix(self) -> str:
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
