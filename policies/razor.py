"""RazorAttention (Tang et al., ICLR 2025, arXiv 2407.15891): keep the retrieval heads' context, cut
the others to the recent past plus one compensation token.

Retrieval heads are the heads that copy (echo: attend to an earlier occurrence of the current token)
or continue (induction: attend to the token after it) on repeated random text, measured once per model
by ``python -m tools.find_heads``: the top ``induction`` fraction of all KV heads by induction score and
the top ``echo`` fraction by echo score. They keep the scorer's best ``budget`` tokens (the paper keeps
all of them; a bounded memory cannot). Every other head keeps the sinks, its ``recent`` newest tokens
and one compensation entry: the mean key and value of everything it dropped, its logit raised by
log(count), updated chunk by chunk as more is dropped. The mean is taken of pre-RoPE keys, and the
entry is rotated at its own slot like any other.

Parameters: ``scorer`` (``snapkv``), ``induction`` (0.14), ``echo`` (0.01), ``recent`` (256; the
paper's max(4000, N/5) is beyond a bounded memory, 256 is its demonstration code's window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies import ModelFacts, PolicyError, register
from policies.head_roles import HeadRoles, top_fraction


@register("razor")
@dataclass
class Razor(HeadRoles):
    induction: float = 0.14
    echo: float = 0.01
    compensate = True
    merges = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("induction", "echo"):
            if not 0 <= getattr(self, name) <= 1:
                raise PolicyError(f"razor {name} must be a fraction of the heads within 0..1")

    def roles(self, model: ModelFacts) -> torch.Tensor:
        induction = top_fraction(model.head_table("razor", "induction"), self.induction)
        return induction | top_fraction(model.head_table("razor", "echo"), self.echo)
