"""Model architectures, registered by the ``architectures`` name a checkpoint's config.json uses."""

from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.registry import Registry

_registry: Registry[nn.Module] = Registry("architecture")
register = _registry.register
available = _registry.available


def build(config: ModelConfig) -> nn.Module:
    return _registry.get(config.architecture, config=config)


from models import llama as _llama  # noqa: E402,F401
from models import mistral as _mistral  # noqa: E402,F401
