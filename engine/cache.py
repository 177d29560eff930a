"""The KV memory: per layer and KV head, the sinks then the kept tokens, in original order.

Each entry carries its pre-RoPE key (so ``positions="compact"`` can renumber after a compression), the
key rotated at the position attention currently gives it (so decode never re-rotates the cache), its
value, its original position, and any per-token state a policy keeps (e.g. H2O's accumulated mass).
Storage grows by doubling, so decode appends in amortised O(1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LayerMemory:
    def __init__(
        self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.length = 0
        self._shape = (batch, kv_heads)
        self._head_dim = head_dim
        self._keys = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._rotated = torch.empty_like(self._keys)
        self._values = torch.empty_like(self._keys)
        self._positions = torch.empty(batch, kv_heads, 0, dtype=torch.long, device=device)
        self._state: dict[str, torch.Tensor] = {}

    @property
    def keys(self) -> torch.Tensor:
        """Pre-RoPE keys [B, Hkv, n, D]."""
        return self._keys[:, :, : self.length]

    @property
    def rotated(self) -> torch.Tensor:
        """Keys rotated at their current attention positions [B, Hkv, n, D]."""
        return self._rotated[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        """Original positions in the sequence [B, Hkv, n]."""
        return self._positions[:, :, : self.length]

    def state(self, name: str) -> torch.Tensor:
        """Per-token policy state [B, Hkv, n] float32 (zeros for tokens the policy has not seen yet)."""
        if name not in self._state:
            self._state[name] = torch.zeros(*self._positions.shape, device=self._positions.device)
        return self._state[name][:, :, : self.length]

    def append(
        self, keys: torch.Tensor, rotated: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Add ``L`` new tokens: keys/rotated/values [B, Hkv, L, D], positions [L] or [B, Hkv, L]."""
        new = keys.shape[2]
        self._reserve(self.length + new)
        end = self.length + new
        self._keys[:, :, self.length : end] = keys
        self._rotated[:, :, self.length : end] = rotated
        self._values[:, :, self.length : end] = values
        self._positions[:, :, self.length : end] = positions
        for buffer in self._state.values():
            buffer[:, :, self.length : end] = 0
        self.length = end

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the entries ``index`` [B, Hkv, m] (sorted per head), in that order."""
        kept = index.shape[-1]
        rows = index[..., None].expand(-1, -1, -1, self._head_dim)
        for buffer in (self._keys, self._rotated, self._values):
            buffer[:, :, :kept] = buffer[:, :, : self.length].gather(2, rows)
        for buffer in (self._positions, *self._state.values()):
            buffer[:, :, :kept] = buffer[:, :, : self.length].gather(2, index)
        self.length = kept

    def truncate(self, length: int) -> None:
        """Forget the newest entries beyond ``length``."""
        self.length = min(self.length, length)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of every entry's tensors, for ``restore``."""
        return {
            "keys": self.keys.clone(),
            "rotated": self.rotated.clone(),
            "values": self.values.clone(),
            "positions": self.positions.clone(),
            **{f"state.{name}": self.state(name).clone() for name in self._state},
        }

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        """Hold exactly the entries of ``saved`` (a ``snapshot``) again."""
        self.length = 0
        self._state = {}
        self.append(saved["keys"], saved["rotated"], saved["values"], saved["positions"])
        for key, value in saved.items():
            if key.startswith("state."):
                self.state(key.removeprefix("state."))[:] = value

    def set_rotated(self, rotated: torch.Tensor) -> None:
        self._rotated[:, :, : self.length] = rotated

    @property
    def nbytes(self) -> int:
        """Bytes held, counting the spare capacity kept for the next step."""
        tensors = (self._keys, self._rotated, self._values, self._positions, *self._state.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _reserve(self, needed: int) -> None:
        capacity = self._keys.shape[2]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 16)

        def grown(buffer: torch.Tensor) -> torch.Tensor:
            bigger = buffer.new_empty(*buffer.shape[:2], capacity, *buffer.shape[3:])
            bigger[:, :, : self.length] = buffer[:, :, : self.length]
            return bigger

        self._keys, self._rotated, self._values = grown(self._keys), grown(self._rotated), grown(self._values)
        self._positions = grown(self._positions)
        self._state = {name: grown(buffer) for name, buffer in self._state.items()}


class KVMemory:
    """All layers' memory plus what is shared: the sink count and how many tokens have been seen."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        sinks: int = 4,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        device = torch.device(device)
        self.layers = [LayerMemory(batch, kv_heads, head_dim, dtype, device) for _ in range(num_layers)]
        self.sinks = sinks
        self.seen = 0  # tokens fed so far, i.e. the original position of the next one

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every layer's entries by name (``"3.keys"``, ``"3.state.h2o_mass"``...), to save the memory."""
        return {
            f"{index}.{name}": tensor.contiguous()
            for index, layer in enumerate(self.layers)
            for name, tensor in layer.snapshot().items()
        }

    def load_tensors(self, tensors: dict[str, torch.Tensor], *, seen: int) -> None:
        """Hold the entries ``tensors`` names (from ``tensors()`` of a memory of the same shape)."""
        for index, layer in enumerate(self.layers):
            prefix = f"{index}."
            layer.restore(
                {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
            )
        self.seen = seen

    def rollback_point(self, *, appending_only: bool) -> Callable[[], None]:
        """A function that puts the memory back as it is now. When what follows only appends (no
        eviction, no state update), forgetting the new entries is enough; otherwise every layer's
        entries are copied now (what a cancelled compressing turn costs)."""
        seen, lengths = self.seen, [layer.length for layer in self.layers]
        saved = None if appending_only else [layer.snapshot() for layer in self.layers]

        @torch.inference_mode()
        def restore() -> None:
            self.seen = seen
            for index, layer in enumerate(self.layers):
                if saved is None:
                    layer.truncate(lengths[index])
                else:
                    layer.restore(saved[index])

        return restore

    def bytes_per_token(self, states: int = 0) -> int:
        """Bytes one more token takes over all layers and KV heads, with ``states`` policy states."""
        layer = self.layers[0]
        batch, kv_heads = layer._shape
        element = layer._keys.element_size()
        per_head = 3 * layer._head_dim * element + layer._positions.element_size() + 4 * states
        return len(self.layers) * batch * kv_heads * per_head

    @property
    def longest(self) -> int:
        """Entries of the longest layer, sinks included."""
        return max((layer.length for layer in self.layers), default=0)

    def kept(self) -> int:
        """Tokens held beyond the sinks, the most over layers (policies may give layers different budgets)."""
        return max((layer.length for layer in self.layers), default=0) - min(self.sinks, self.seen)
