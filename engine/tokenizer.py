"""The engine's tokenizer: ``tokenizer.json`` or ``tokenizer.model``, chat templates, streaming decode.

No ``transformers`` at run time: ``tokenizers`` or ``sentencepiece`` do the encoding, and chat
templates are rendered the way ``transformers`` renders them (sandboxed Jinja, same globals).
"""

from __future__ import annotations

import json
import operator
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.config import read_json_object


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or was given input it cannot handle."""


class TokenizerNotFoundError(FileNotFoundError):
    """A checkpoint directory has no tokenizer file."""


class ChatTemplateError(ValueError):
    """A chat template failed to compile or to render; the message says why."""


# Bounds on rendering a chat template, which is code shipped with a checkpoint.
TEMPLATE_SECONDS = 2.0
TEMPLATE_EXTRA_CHARS = 1 << 20  # on top of 4x the conversation's own text
TEMPLATE_MAX_NUMBER = 1 << 20  # largest repeat count, exponent bits or numeric call argument

# Used when a checkpoint ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# tokenizer_config.json entries that templates may use, as transformers passes them.
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


class _Backend(Protocol):
    """What the two tokenizer libraries provide, reduced to what ``Tokenizer`` needs."""

    vocab_size: int
    default_bos_id: int | None  # used when tokenizer_config.json names none
    default_eos_id: int | None

    def adds_around(self, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]: ...  # BOS?, EOS?
    def encode(self, text: str) -> list[int]: ...  # special-token texts become their ids; nothing added
    def decode(self, ids: Sequence[int], skip_special: bool) -> str: ...
    def token_id(self, text: str) -> int | None: ...
    def token_text(self, token_id: int) -> str: ...


class _TokenizersBackend:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, source: Path | tokenizers.Tokenizer) -> None:
        if isinstance(source, tokenizers.Tokenizer):
            self._tokenizer = source
        else:
            try:
                self._tokenizer = tokenizers.Tokenizer.from_file(str(source))
            except Exception as error:  # the Rust side reports every problem as a bare Exception
                raise TokenizerError(f"cannot load {source}: {error}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.default_bos_id = self.default_eos_id = None

    def adds_around(self, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
        # The post-processor's additions, seen around the empty text. ``Tokenizer`` adds them itself
        # so that tokenizer_config.json's add_bos_token / add_eos_token can override them.
        wrapping = self._tokenizer.encode("", add_special_tokens=True).ids
        adds_bos = bos_id is not None and wrapping[:1] == [bos_id]
        adds_eos = eos_id is not None and wrapping[-1:] == [eos_id] and len(wrapping) > adds_bos
        return adds_bos, adds_eos

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self._tokenizer.token_to_id(text)

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id)


class _SentencePieceBackend:
    """A SentencePiece ``tokenizer.model`` (Llama 2, Mistral), with control-token texts parsed."""

    def __init__(self, path: Path) -> None:
        self._model = sentencepiece.SentencePieceProcessor()
        try:
            self._model.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"cannot load {path} as a SentencePiece model: {error}") from None
        self.vocab_size = self._model.get_piece_size()
        self.default_bos_id = self._model.bos_id() if self._model.bos_id() >= 0 else None
        self.default_eos_id = self._model.eos_id() if self._model.eos_id() >= 0 else None
        # SentencePiece reads "<s>" in a text as three characters; Hugging Face reads it as the BOS.
        self._special = {
            self._model.id_to_piece(index): index
            for index in range(self.vocab_size)
            if self._model.is_control(index) or self._model.is_unknown(index)
        }
        self._special_ids = frozenset(self._special.values())
        texts = sorted(self._special, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None

    def adds_around(self, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
        return bos_id is not None, False  # the Llama convention

    def encode(self, text: str) -> list[int]:
        if self._special_split is None:
            return self._model.encode(text)
        ids: list[int] = []
        for index, part in enumerate(self._special_split.split(text)):
            if index % 2:
                ids.append(self._special[part])
            elif part:
                ids.extend(self._model.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        if skip_special:
            return self._model.decode([i for i in ids if i not in self._special_ids])
        parts, run = [], []
        for token_id in ids:
            if token_id in self._special_ids:
                parts += [self._model.decode(run), self._model.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        return "".join([*parts, self._model.decode(run)])

    def token_id(self, text: str) -> int | None:
        index = self._model.piece_to_id(text)
        return None if self._model.is_unknown(index) and self._model.id_to_piece(index) != text else index

    def token_text(self, token_id: int) -> str:
        return self._model.id_to_piece(token_id)


class StreamDecoder:
    """Turns generated ids into text as they arrive, never emitting a partial character.

    Each ``push`` decodes the whole sequence so far and returns only the new, settled text: text that
    ends in U+FFFD (bytes of a character still to come) is held back. ``flush`` returns the rest, so
    the pushes and the flush concatenate to ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool) -> None:
        self._tokenizer, self._skip_special = tokenizer, skip_special
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        self._ids += self._tokenizer._checked_ids([token_id])
        text = self._tokenizer._backend.decode(self._ids, self._skip_special)
        settled = len(text.rstrip("\ufffd"))
        if settled <= self._emitted:
            return ""
        new, self._emitted = text[self._emitted : settled], settled
        return new

    def flush(self) -> str:
        text = self._tokenizer._backend.decode(self._ids, self._skip_special)
        new, self._emitted = text[self._emitted :], len(text)
        return new


class Tokenizer:
    """Encodes, decodes and renders chats for one checkpoint; build it with ``load_tokenizer``."""

    def __init__(self, backend: _Backend, config: Mapping[str, Any], chat_template: str) -> None:
        self._backend = backend
        self._special_tokens = _special_tokens(config)
        self.bos_id = self._configured_id("bos_token", backend.default_bos_id)
        self.eos_id = self._configured_id("eos_token", backend.default_eos_id)
        adds_bos, adds_eos = backend.adds_around(self.bos_id, self.eos_id)
        self.add_bos = bool(config.get("add_bos_token", adds_bos)) and self.bos_id is not None
        self.add_eos = bool(config.get("add_eos_token", adds_eos)) and self.eos_id is not None
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if token_id is not None:
                self._special_tokens.setdefault(key, backend.token_text(token_id))
        self.chat_template = chat_template

    def _configured_id(self, key: str, default: int | None) -> int | None:
        text = self._special_tokens.get(key)
        if text is None:
            return default
        token_id = self._backend.token_id(text)
        if token_id is None:
            raise TokenizerError(
                f"tokenizer_config.json names {key} {text!r}, which is not in the vocabulary"
            )
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds what the tokenizer itself adds (e.g. a Llama BOS)."""
        _check_text(text)
        ids = self._backend.encode(text)
        if add_special:
            ids = [self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._backend.decode(self._checked_ids(ids), skip_special)

    def stream_decoder(self, *, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def id_of(self, token_text: str) -> int | None:
        """The id of a single token written as text (e.g. ``"<|im_end|>"``), or None if there is none."""
        return self._backend.token_id(token_text)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The chat as the model expects it, by its chat template (or ChatML when it ships none)."""
        variables = {
            **self._special_tokens,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            # transformers always passes these, and templates test them with "is not none".
            "tools": None,
            "documents": None,
        }
        content = sum(len(str(message.get("content", ""))) for message in messages)
        try:
            return _render_bounded(
                self._compiled_template, variables, max_chars=4 * content + TEMPLATE_EXTRA_CHARS
            )
        except _TemplateLimit as error:
            raise ChatTemplateError(f"the chat template was stopped: {error}") from None
        except _TemplateRaised as error:
            raise ChatTemplateError(f"the chat template rejected the conversation: {error}") from None
        except Exception as error:  # the template is code from the checkpoint; any failure is its failure
            raise ChatTemplateError(f"the chat template failed: {type(error).__name__}: {error}") from None

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat, with exactly one BOS where the tokenizer adds one."""
        return self.encode_rendered(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of text a chat template rendered (or the start of it).

        Templates often write the BOS text themselves; the BOS is then not added a second time.
        """
        ids = self.encode(text, add_special=False)
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        environment = _BoundedSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            return environment.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(
                f"the chat template has a syntax error on line {error.lineno}: {error}"
            ) from None

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as plain ints (numpy and torch integers welcome), each inside the vocabulary."""
        try:
            plain = [operator.index(token_id) for token_id in ids]
        except TypeError:
            raise TokenizerError(f"token ids must be integers, got {list(ids)[:8]!r}") from None
        outside = [token_id for token_id in plain if not 0 <= token_id < self.vocab_size]
        if outside:
            raise TokenizerError(
                f"token id {outside[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        return plain


def load_tokenizer(directory: Path, *, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory; ``chat_template`` (the text) overrides the checkpoint's."""
    directory = Path(directory)
    config = read_json_object(directory / "tokenizer_config.json", TokenizerError) or {}
    backend: _Backend
    if (directory / "tokenizer.json").is_file():
        backend = _TokenizersBackend(directory / "tokenizer.json")
    elif (directory / "tokenizer.model").is_file():
        backend = _SentencePieceBackend(directory / "tokenizer.model")
    else:
        raise TokenizerNotFoundError(
            f"{directory} has neither tokenizer.json nor tokenizer.model: is it a checkpoint directory?"
        )
    if chat_template is None:
        chat_template = _configured_template(config, directory)
    return Tokenizer(backend, config, chat_template)


def tokenizer_from(
    tokenizer: tokenizers.Tokenizer, config: Mapping[str, Any], *, chat_template: str | None = None
) -> Tokenizer:
    """The engine's tokenizer over a ``tokenizers`` object and tokenizer_config's contents (a GGUF
    file's vocabulary, read without writing files)."""
    if chat_template is None:
        chat_template = _configured_template(config, None)
    return Tokenizer(_TokenizersBackend(tokenizer), config, chat_template)


def _configured_template(config: Mapping[str, Any], directory: Path | None) -> str:
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if "default" not in named:
            raise TokenizerError(
                f"tokenizer_config.json has chat templates named {sorted(map(str, named))} but none named "
                "'default': pass the one to use as a chat template file"
            )
        template = named["default"]
    if isinstance(template, str):
        return template
    template_file = None if directory is None else directory / "chat_template.jinja"
    if template_file is not None and template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    return CHATML_TEMPLATE


def _special_tokens(config: Mapping[str, Any]) -> dict[str, Any]:
    tokens: dict[str, Any] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    if isinstance(config.get("additional_special_tokens"), list):
        tokens["additional_special_tokens"] = config["additional_special_tokens"]
    return tokens


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"expected text (str) to tokenize, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TokenizerError(
            f"the text holds {text[error.start]!r} at position {error.start}, a lone surrogate that is not "
            "valid Unicode: remove it, or decode the input with errors='replace'"
        ) from None


class _TemplateRaised(Exception):
    """A template called ``raise_exception``."""


class _TemplateLimit(Exception):
    """A template ran too long, or built text or lists too large to be a prompt."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, also refusing ``*`` and ``**`` whose results would be huge (``'a' * 10**9``) and
    calls with huge numeric arguments (``'x'.ljust(10**9)``): such values are built in one step, before
    any time or size limit could see them."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > TEMPLATE_MAX_NUMBER.bit_length():
            raise _TemplateLimit(f"an exponent of {right} is too large for a chat template")
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                repeated = isinstance(sequence, (str, list, tuple)) and isinstance(count, int)
                if repeated and len(sequence) * count > TEMPLATE_MAX_NUMBER:
                    kind = type(sequence).__name__
                    raise _TemplateLimit(f"repeating a {kind} {count} times is too large")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > TEMPLATE_MAX_NUMBER:
                raise _TemplateLimit(f"an argument of {value} is too large for a chat template")
        return super().call(__context, __obj, *args, **kwargs)


def _render_bounded(template: jinja2.Template, variables: dict[str, Any], *, max_chars: int) -> str:
    """Render within ``TEMPLATE_SECONDS`` and ``max_chars``: templates come with checkpoints and are
    untrusted. The time limit is a trace function on the template's own frames, so a loop that
    writes nothing (nested ``range(100000)``) is stopped too."""
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TemplateLimit(f"it ran for more than {TEMPLATE_SECONDS:g} s (a loop far too long?)")
        return trace

    pieces, size = [], 0
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > max_chars:
                raise _TemplateLimit(f"it wrote more than {max_chars} characters for this conversation")
            pieces.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(pieces)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt must carry them verbatim.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
