"""The RLHF side of the paper (§3): a Bradley–Terry reward model (`directpo.rlhf.reward_model`,
training) and PPO with a KL penalty (eq. 3, `directpo.rlhf.ppo`).

Scoring (a trained reward model, or any Python callable) lives in `directpo.eval.scorers` and
`directpo.eval.reward_model`. Import the submodules directly; this package imports nothing.
"""
