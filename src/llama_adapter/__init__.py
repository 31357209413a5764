"""llama-adapter: zero-init attention adapters for frozen LLaMA-family models."""

from .config import Config
from .model import LLaMA

__all__ = ["Config", "LLaMA"]
__version__ = "0.1.0"
