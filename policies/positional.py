"""Policies that need no statistics: they decide by position alone (or by chance)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies import Candidates, Policy, register


@register("none")
class KeepAll(Policy):
    """No compression: the memory keeps every token whatever the budget."""

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int | None:
        return None


@register("streaming")
class Streaming(Policy):
    """StreamingLLM: the sinks plus the most recent tokens."""

    def score(self, candidates: Candidates) -> torch.Tensor:
        return candidates.positions.float()


@register("local_window")
class LocalWindow(Policy):
    """No memory at all beyond the sinks: each chunk attends only to itself (and the sinks; use
    ``sinks=0`` for the IMDC code's exact ``local_window``)."""

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int | None:
        return 0

    def score(self, candidates: Candidates) -> torch.Tensor:
        return torch.zeros(candidates.positions.shape, device=candidates.keys.device)


@register("random")
@dataclass
class Random(Policy):
    """Uniformly random tokens, reproducible from ``seed`` for each layer and step, kept in order."""

    seed: int = 0

    def score(self, candidates: Candidates) -> torch.Tensor:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(hash((self.seed, candidates.layer, candidates.step)) & 0x7FFF_FFFF_FFFF)
        scores = torch.rand(candidates.positions.shape, generator=generator)
        return scores.to(candidates.keys.device)
