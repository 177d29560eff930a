"""Mistral: the Llama modules with sliding-window attention."""

from __future__ import annotations

from engine.config import ModelConfig
from models import register
from models.llama import LlamaForCausalLM


@register("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.sliding_window = config.sliding_window
