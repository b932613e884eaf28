"""The GPT-2 model and the training runtime (trainer, distributed setup, checkpoints, metrics)."""

from common.errors import UserError
from gpt.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "UserError"]
