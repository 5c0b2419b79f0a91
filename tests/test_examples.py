"""The examples run as a user runs them (`python examples/python_api.py`), on a tiny local model."""
import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_api_example_trains_scores_and_evaluates(tmp_path, capsys):
    out = _load("python_api").main(tmp_path / "run")
    printed = capsys.readouterr().out
    assert "trained:" in printed and "scored:" in printed and "evaluated dpo:" in printed
    # DPO learned the held-out preference (chance 0.5), and scoring agrees with its own evaluation
    assert out["eval"]["rewards/accuracies"] > 0.6
    assert out["score"]["pairs"] == 32 and abs(out["score"]["implicit_reward_accuracy"]
                                               - out["eval"]["rewards/accuracies"]) < 1e-6
    # the SFT model is its own reference: KL 0; the DPO policy moved away from it
    assert out["evaluate"]["sft"]["kl_mean"] == 0.0 and out["evaluate"]["dpo"]["kl_mean"] > 0
    assert (tmp_path / "run" / "dpo" / "model.safetensors").exists()
