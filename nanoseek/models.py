"""``build_model(cfg)``: the model class a config's family builds.

Every family but DeepSeek-V4 is ``model.Transformer`` (MLA or grouped-query attention, DeepSeekMoE);
V4's residual streams and compressed attention are ``v4.V4Transformer``, with the same interface.
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .model import Transformer
from .v4 import V4Transformer


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of `cfg` (on the current default device)."""
    return V4Transformer(cfg) if cfg.attention == "v4" else Transformer(cfg)
