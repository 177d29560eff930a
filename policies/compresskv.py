"""CompressKV (Lin et al., 2025, arXiv 2508.02401): semantic retrieval heads choose for their layer,
and layers get budgets by how much compression hurts them.

Offline, ``python -m tools.find_heads`` finds each layer's semantic retrieval heads (the query heads
that attend to a needle's whole span while the model answers needle-in-a-haystack questions) and each
layer's output error when its memory is compressed. Online, a layer scores tokens as SnapKV does, but
from the attention of its ``heads`` best retrieval heads only (their mean), and keeps one set of tokens
for all its KV heads. A layer's budget is ``32 + its share of the error x (L x B - 32 L)``, within
32..3B, so that the layers' mean is the step's budget B.

Parameters: ``window`` (8), ``kernel`` (5), ``heads`` (4 per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policies import Candidates, ModelFacts, Needs, Policy, PolicyError, apportion, register
from policies.snapkv import window_votes

FLOOR = 32


@register("compresskv")
@dataclass
class CompressKV(Policy):
    window: int = 8
    kernel: int = 5
    heads: int = 4
    retrieval: torch.Tensor | None = field(default=None, init=False, repr=False)  # [layers, heads]
    layer_error: list[float] = field(default_factory=list, init=False, repr=False)
    _budgets: dict[tuple[int, int], list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window > 0):
            raise PolicyError(f"compresskv window must be a positive number of queries, got {self.window!r}")
        if not (isinstance(self.kernel, int) and self.kernel > 0 and self.kernel % 2 == 1):
            raise PolicyError(f"compresskv kernel must be a positive odd integer, got {self.kernel!r}")
        if not (isinstance(self.heads, int) and self.heads > 0):
            raise PolicyError(f"compresskv heads must be a positive count of query heads, got {self.heads!r}")

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(queries=self.window, by_query_head=True)

    def prepare(self, model: ModelFacts) -> None:
        table = model.head_table("compresskv", "retrieval", query_heads=True)
        self.retrieval = table.topk(min(self.heads, model.num_heads), dim=1).indices
        errors = model.calibration("compresskv").get("layer_error")
        if (
            not isinstance(errors, list)
            or len(errors) != model.num_layers
            or not all(isinstance(e, int | float) and e >= 0 for e in errors)
        ):
            raise PolicyError(
                f"the calibration's compresskv.layer_error is not {model.num_layers} errors >= 0: run "
                f"`{model.calibrate_command}` to remake it"
            )
        self.layer_error = [float(e) for e in errors]
        self._budgets = {}

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int | None:
        if not self.layer_error:
            raise PolicyError("compresskv was not prepared for a model")
        if (budget, num_layers) not in self._budgets:
            self._budgets[budget, num_layers] = apportion(
                budget * num_layers, self.layer_error, min(FLOOR, budget), [3 * budget] * num_layers
            )
        return self._budgets[budget, num_layers][layer]

    def score(self, candidates: Candidates) -> torch.Tensor:
        mass, count = candidates.stats  # mass per query head [B, Hq, n]
        chosen = mass[:, self.retrieval[candidates.layer].to(mass.device)].mean(dim=1, keepdim=True)
        if count.dim() == 3:
            count = count[:, :1]
        scores = window_votes(chosen, count, self.kernel, self.window)
        return scores.expand(*candidates.keys.shape[:3])
