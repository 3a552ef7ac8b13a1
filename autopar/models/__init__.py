"""Built-in models for the CLI, the demo, tests and benchmarks (random weights)."""

from autopar.models import zoo
from autopar.models.gpt import GPT, GPTConfig, gpt_config
from autopar.models.mlp import MLP

__all__ = ["GPT", "GPTConfig", "MLP", "gpt_config", "zoo"]
