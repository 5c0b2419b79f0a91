"""The RLHF side of the paper (§3): a Bradley–Terry reward model, PPO with a KL penalty (eq. 3),
and reward functions (a trained reward model, or any Python callable)."""
from .rewards import load_callable, load_reward_fn, review_sentiment

__all__ = ["load_callable", "load_reward_fn", "review_sentiment"]
