"""nanoseek: the whole DeepSeek recipe in one readable PyTorch codebase."""

from .config import ModelConfig
from .model import Transformer
from .hf import load_pretrained, save_pretrained

__all__ = ["ModelConfig", "Transformer", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
