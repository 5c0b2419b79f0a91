"""directpo: Direct Preference Optimization (Rafailov et al., 2023) for any Hugging Face causal LM.

The Python API (`directpo.api`), one function per job, each taking its settings object or the
same settings as keywords, as the commands do:

    import directpo

    result = directpo.train(model="my-sft-model", data="pairs.jsonl", output_dir="runs/dpo", max_steps=200)
    result.train["rewards/accuracies"]          # the last step's metrics line
    result.metrics                              # every metrics.jsonl record

Names are loaded on first use, so `import directpo` loads neither torch nor transformers.
"""
__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    # jobs
    "train": "directpo.api", "sft": "directpo.api", "pipeline": "directpo.api", "train_reward_model": "directpo.api", "ppo": "directpo.api",
    "online": "directpo.api", "plan": "directpo.api", "result_of": "directpo.api",
    "score": "directpo.api", "sample": "directpo.api", "best_of_n": "directpo.api", "evaluate": "directpo.api",
    "inspect_data": "directpo.api", "merge": "directpo.api",
    # results and callbacks
    "RunResult": "directpo.api", "Callback": "directpo.training.run",
    # settings
    "TrainConfig": "directpo.training.config", "PipelineConfig": "directpo.training.config", "RewardModelConfig": "directpo.rlhf.config",
    "PPOConfig": "directpo.rlhf.config", "OnlineConfig": "directpo.rlhf.online",
    "PlanConfig": "directpo.training.plan", "ScoreConfig": "directpo.eval.config",
    "SampleConfig": "directpo.eval.config", "BonConfig": "directpo.eval.config", "EvalConfig": "directpo.eval.config",
    "InspectConfig": "directpo.inspect.config", "MergeConfig": "directpo.training.merge",
    # the loss, as a pure function, and the registry of every loss
    "dpo_loss": "directpo.losses", "LOSSES": "directpo.losses",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'directpo' has no attribute {name!r}")
