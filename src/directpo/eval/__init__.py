"""Evaluation: sampling (`sampling`), scorers (`scorers`: reward functions, `reward_model`: trained
reward models), Best-of-N (`bon`), judges (`judge`: reward, callable, OpenAI-compatible chat
endpoint), sequence-level KL(π‖πref), win rates and temperature sweeps (`evaluate`), implicit-reward
scoring of preference files (`score`).

Import the submodules directly; this package imports nothing. Prompt files are read by
`directpo.data.prompts`.
"""
