"""Rotary position embedding, rotate-half layout (the Hugging Face checkpoint convention)."""

from __future__ import annotations

import math

import torch

from engine.config import RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim // 2], float32, with linear or llama3 scaling applied."""
    # float32 throughout, as the checkpoints were trained: a float64 table differs by ~1e-4 rad at 8k.
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between blended.
        wavelength = 2 * math.pi / inv_freq
        low_cutoff = rope.original_max_positions / rope.low_freq_factor
        high_cutoff = rope.original_max_positions / rope.high_freq_factor
        blend = (rope.original_max_positions / wavelength - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - blend) * inv_freq / rope.factor + blend * inv_freq
        inv_freq = torch.where(wavelength > low_cutoff, inv_freq / rope.factor, inv_freq)
        inv_freq = torch.where((wavelength <= low_cutoff) & (wavelength >= high_cutoff), blended, inv_freq)
    return inv_freq


class Rope:
    """Rotates queries and keys at arbitrary integer positions, with a cos/sin table grown on demand."""

    def __init__(self, head_dim: int, rope: RopeConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inverse_frequencies(head_dim, rope).to(device)
        self._cos = self._sin = torch.empty(0, head_dim, device=device)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [..., L, D] rotated at ``positions`` ([L], or [..., L] broadcastable to x's leading dims)."""
        return self.apply(x, *self.at(positions, x.dtype))

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., L, D] at arbitrary ``positions``."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0]:
            self._grow(needed)
        return self._cos[positions].to(dtype), self._sin[positions].to(dtype)

    def span(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, D] at positions start..start+length-1: a slice of the table, no search
        for the largest position (decode asks for one position per layer and token)."""
        if start + length > self._cos.shape[0]:
            self._grow(start + length)
        return self._cos[start : start + length].to(dtype), self._sin[start : start + length].to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x rotated by the angles whose ``cos`` and ``sin`` are given (rotate-half layout)."""
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated_half * sin

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self._cos.shape[0], 1024)
        angles = torch.outer(
            torch.arange(size, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq
        )
        angles = torch.cat((angles, angles), dim=-1)
        self._cos, self._sin = angles.cos(), angles.sin()
