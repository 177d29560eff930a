"""DuoAttention (Xiao et al., ICLR 2025, arXiv 2410.10819) with a training-free head score.

A fraction of the KV heads, ``streaming``, become streaming heads: they keep the tokens at positions
below ``sink`` and their ``recent`` newest. The rest are retrieval heads and keep the scorer's best
``budget`` tokens. DuoAttention learns which heads stream; without training, the heads are ranked by
kvpress's proxy (``scores="proxy"``: how far back the mean query of a head looks at the mean key, over
RoPE distances 0..499, measured on text by ``python -m tools.find_heads``) or by RazorAttention's
induction score (``scores="razor"``). The lowest-ranked stream.

Parameters: ``scorer`` (``snapkv``), ``streaming`` (0.5, the paper's ratio for GQA models), ``sink``
(64) and ``recent`` (256), the paper's evaluation window; ``scores`` (``"proxy"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies import ModelFacts, PolicyError, register
from policies.head_roles import HeadRoles, top_fraction

SCORES = {"proxy": ("duo", "proxy"), "razor": ("razor", "induction")}


@register("duo")
@dataclass
class Duo(HeadRoles):
    streaming: float = 0.5
    sink: int = 64
    scores: str = "proxy"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.streaming <= 1:
            raise PolicyError(f"duo streaming must be a fraction within 0..1, got {self.streaming!r}")
        if self.scores not in SCORES:
            raise PolicyError(f"duo scores must be one of {', '.join(SCORES)}, got {self.scores!r}")

    def roles(self, model: ModelFacts) -> torch.Tensor:
        table = model.head_table(*SCORES[self.scores])
        return top_fraction(table, 1 - self.streaming)
