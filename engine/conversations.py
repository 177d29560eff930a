"""Conversations kept between requests: each one's compressed memory and the text it holds.

A request whose rendered prompt extends a kept conversation's text continues over that memory and
reads only the new tokens, as llama-server's prompt cache does, but over a compressed memory. The
conversations live in an LRU bounded in bytes; with a folder they are also saved there (safetensors
and JSON metadata, never pickle) and found again after a restart.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from engine.cache import KVMemory
from engine.prefill import PrefillConfig


@dataclass
class Conversation:
    text: str  # the rendered prompt and answers whose tokens the memory holds
    ids: list[int]  # those tokens
    memory: KVMemory
    settings: str  # what the memory was made with (config_key): continued only under the same settings

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes


def config_key(config: PrefillConfig) -> str:
    """The settings that shaped a memory, as text: another request continues it only if they match."""
    fields = asdict(config)
    fields.pop("query_window", None)  # only shapes the first reading, not what continues it
    return json.dumps(fields, sort_keys=True, default=str)


class ConversationCache:
    """The kept conversations, newest last; ``take`` the one a prompt extends, ``put`` it back after."""

    def __init__(self, limit_bytes: int, folder: Path | None, model_fingerprint: str) -> None:
        self.limit_bytes = limit_bytes
        self.folder = folder
        self.fingerprint = model_fingerprint
        self._memory: OrderedDict[str, Conversation] = OrderedDict()
        self._saved: dict[str, dict] = {}  # id -> metadata of conversations on disk only
        self._lock = threading.Lock()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as reader:
                    metadata = reader.metadata() or {}
                if metadata.get("fingerprint") == model_fingerprint:
                    self._saved[path.stem] = metadata

    @property
    def nbytes(self) -> int:
        return sum(conversation.nbytes for conversation in self._memory.values())

    def __len__(self) -> int:
        return len(self._memory) + len(self._saved)

    def take(self, text: str, settings: str, new_memory) -> Conversation | None:
        """Remove and return the conversation with the longest text that ``text`` starts with, made
        with ``settings``; ``new_memory()`` makes the empty memory a saved one is loaded into."""
        with self._lock:
            candidates = [
                (len(c.text), key)
                for key, c in self._memory.items()
                if _extends(text, c.text, settings, c.settings)
            ]
            candidates += [
                (len(meta["text"]), key)
                for key, meta in self._saved.items()
                if _extends(text, meta["text"], settings, meta["settings"])
            ]
            if not candidates:
                return None
            _, key = max(candidates)
            conversation = self._memory.pop(key, None)
            metadata = self._saved.pop(key, None)
        path = None if self.folder is None else self.folder / f"{key}.safetensors"
        if conversation is None:
            memory = new_memory()
            with safe_open(str(path), framework="pt") as reader:
                tensors = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
            memory.load_tensors(tensors, seen=int(metadata["seen"]))
            conversation = Conversation(
                metadata["text"], json.loads(metadata["ids"]), memory, metadata["settings"]
            )
        if path is not None:
            path.unlink(missing_ok=True)  # in use now; saved again, extended, when it is put back
        return conversation

    def put(self, conversation: Conversation) -> None:
        """Keep ``conversation`` (saving it when there is a folder), then drop the least recently used
        ones beyond the byte limit from RAM (they stay on disk when saved)."""
        key = hashlib.sha256(conversation.text.encode("utf-8")).hexdigest()[:24]
        if self.folder is not None:
            self._save(key, conversation)
        with self._lock:
            self._memory[key] = conversation
            self._memory.move_to_end(key)
            while self._memory and self.nbytes > self.limit_bytes:
                dropped, old = self._memory.popitem(last=False)
                if self.folder is not None:
                    self._saved[dropped] = self._metadata(old)

    def _metadata(self, conversation: Conversation) -> dict[str, str]:
        return {
            "text": conversation.text,
            "ids": json.dumps(conversation.ids),
            "seen": str(conversation.memory.seen),
            "settings": conversation.settings,
            "fingerprint": self.fingerprint,
        }

    def _save(self, key: str, conversation: Conversation) -> None:
        path = self.folder / f"{key}.safetensors"
        partial = path.with_suffix(".partial")
        save_file(conversation.memory.tensors(), str(partial), metadata=self._metadata(conversation))
        partial.replace(path)


def _extends(text: str, kept: str, settings: str, kept_settings: str) -> bool:
    return settings == kept_settings and len(kept) > 0 and text.startswith(kept)
