"""Evaluation: sampling, Best-of-N, judges (reward model, callable, OpenAI-compatible chat endpoint),
sequence-level KL(π‖πref), win rates and temperature sweeps."""
from .sampling import PromptItem, generate_completions, load_prompts, sample

__all__ = ["PromptItem", "generate_completions", "load_prompts", "sample"]
