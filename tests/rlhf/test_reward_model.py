"""Bradley–Terry loss (eq. 2), the reward model (`directpo rm`), reward callables."""
import json
import math

import pytest
import torch

from directpo.cli import main
from directpo.eval.reward_model import RewardModel
from directpo.eval.scorers import load_callable, load_reward_fn, review_sentiment
from directpo.losses import bradley_terry_loss
from directpo.toy import review_task, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bradley_terry_hand_values():
    chosen = torch.tensor([0.0, 1.0, 2.0, -1.0, -100.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    loss = bradley_terry_loss(chosen, rejected)
    # −log σ(d) = log(1 + e^{−d})
    expected = [math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2)), 100.0]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    # Other inputs, against −log p(yw ≻ yl) with p = 1 / (1 + e^{−d}) written out independently.
    g = torch.Generator().manual_seed(0)
    c = 3 * torch.randn(64, generator=g, dtype=torch.float64)
    r = 3 * torch.randn(64, generator=g, dtype=torch.float64)
    independent = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(c.tolist(), r.tolist())]
    assert bradley_terry_loss(c, r).tolist() == pytest.approx(independent, rel=1e-9)
    # and finite where the naive formula is not: e^{1000} overflows, log σ(−1000) = −1000
    far = bradley_terry_loss(torch.tensor([1000.0, -1000.0]), torch.tensor([0.0, 0.0]))
    assert far.tolist() == pytest.approx([0.0, 1000.0], abs=1e-6)
    loss.sum().backward()
    # d/dr(yw) = −σ(−d): −½ at d = 0, → −1 for a badly wrong pair, and only differences matter
    assert chosen.grad.tolist() == pytest.approx([-0.5, -1 / (1 + math.e), -1 / (1 + math.e ** 2),
                                                  -1 / (1 + math.e ** -2), -1.0], rel=1e-6)
    shifted = bradley_terry_loss(chosen.detach() + 3.0, rejected + 3.0)
    assert shifted.tolist() == pytest.approx(loss.detach().tolist(), rel=1e-6)


@pytest.fixture(scope="module")
def review_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm-data")
    train, held_out = review_task(n_train=256, n_eval=128, seed=11)
    return write_jsonl(train, d / "train.jsonl"), write_jsonl(held_out, d / "eval.jsonl"), train, held_out


@pytest.fixture(scope="module")
def trained_rm(tiny_model, review_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    code = main(["rm", "--model", str(tiny_model), "--data", str(review_files[0]), "--eval-data", str(review_files[1]),
                 "--output-dir", str(out), "--lr", "1e-3", "--optimizer", "adamw", "--batch-size", "32",
                 "--micro-batch-size", "32", "--max-steps", "60", "--warmup-steps", "5", "--eval-every", "30",
                 "--max-length", "64", "--no-progress"])
    assert code == 0
    return out


def test_rm_separates_synthetic_task(trained_rm, review_files):
    """Chosen reviews carry more praise than criticism: a linearly separable preference. Held-out
    pairs are about unseen films and word combinations."""
    lines = [json.loads(line) for line in open(trained_rm / "metrics.jsonl")]
    train = [m for m in lines if m["split"] == "train"]
    evals = [m for m in lines if m["split"] == "eval"]
    assert [m["step"] for m in train] == list(range(1, 61))
    assert all(math.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1 for m in train)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["accuracy"] > 0.95, evals
    assert evals[-1]["loss"] < evals[0]["loss"]
    # Saved in HF format with safetensors, the normalising offset in the config
    assert (trained_rm / "model.safetensors").exists()
    config = json.loads((trained_rm / "config.json").read_text())
    assert "reward_offset" in config and config["pad_token_id"] is not None

    # The scorer agrees with the training-time evaluation, and is normalised: E[r] = 0 on the training data
    rm = RewardModel(str(trained_rm))
    _, _, train_rows, held_out = review_files
    chosen = rm([r["prompt"] for r in held_out], [r["chosen"] for r in held_out])
    rejected = rm([r["prompt"] for r in held_out], [r["rejected"] for r in held_out])
    acc = sum(c > r for c, r in zip(chosen, rejected)) / len(held_out)
    assert acc == pytest.approx(evals[-1]["accuracy"])
    all_train = rm([r["prompt"] for r in train_rows] * 2,
                   [r["chosen"] for r in train_rows] + [r["rejected"] for r in train_rows])
    assert abs(sum(all_train) / len(all_train)) < 1e-4
    assert max(all_train) - min(all_train) > 1.0  # not normalised into a constant


def test_rm_reads_the_last_real_token_whatever_the_padding(trained_rm):
    """A response's reward must not depend on what it is batched with (right padding)."""
    rm = RewardModel(str(trained_rm), batch_size=8)
    short = ("Review of Kalo:", " It was great.")
    long = ("Review of Kalo:", " I found it superb and lovely; the music was warm, warm, warm and fresh.")
    alone = rm([short[0]], [short[1]])[0]
    batched = rm([long[0], short[0]], [long[1], short[1]])
    assert batched[1] == pytest.approx(alone, abs=1e-5)
    assert batched[0] != pytest.approx(alone, abs=1e-3)


def test_rm_bad_data_names_file_row_field(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" +
                   json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    code = main(["rm", "--model", str(tiny_model), "--data", str(bad), "--output-dir", str(tmp_path / "o"),
                 "--max-steps", "1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2, field 'rejected'" in err


def test_reward_fn_loading(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompt, completion):\n    return len(completion)\n\n"
        "def batched(prompts, completions):\n    return [1.0] * len(completions)\nbatched.batched = True\n\n"
        "def broken(prompt, completion):\n    return float('nan')\n\n"
        "def wrong_type(prompt, completion):\n    return 'high'\n")
    monkeypatch.chdir(tmp_path)  # the module is found in the current directory
    score = load_reward_fn(reward_fn="my_rewards:length")
    assert score(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    assert load_reward_fn(reward_fn="my_rewards:batched")(["p"] * 3, ["a", "b", "c"]) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="completion 0, expected a finite number"):
        load_reward_fn(reward_fn="my_rewards:broken")(["p"], ["a"])
    with pytest.raises(ValueError, match="returned 'high'"):
        load_reward_fn(reward_fn="my_rewards:wrong_type")(["p"], ["a"])
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_callable("my_rewards.length")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        load_callable("no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_callable("my_rewards:missing")
    with pytest.raises(ValueError, match="exactly one"):
        load_reward_fn()
    assert review_sentiment("Review of X:", " It was great, superb and dull.") == 1.0
    assert review_sentiment("", "Awful, boring; BLAND!") == -3.0


def test_a_language_model_given_as_reward_model_is_refused(tiny_model, tmp_path, capsys):
    """Before: `bon --reward-model <a causal LM>` scored with a freshly drawn random head and wrote the
    "best" samples as a success. Now the head missing from the checkpoint is one line."""
    from directpo.errors import UserValueError

    from directpo.eval.scorers import ClassifierReward

    with pytest.raises(UserValueError, match="no reward head"):
        RewardModel(str(tiny_model))
    with pytest.raises(UserValueError, match="no classification head"):  # (was: a random head's P(class 1))
        ClassifierReward(str(tiny_model), positive_label=1)
    prompts = write_jsonl([{"prompt": "Review:"}], tmp_path / "p.jsonl")
    assert main(["bon", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(tmp_path / "b.jsonl"),
                 "--n", "2", "--max-new-tokens", "2", "--reward-model", str(tiny_model), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "directpo rm" in err and "--reward-model" in err
    assert not (tmp_path / "b.jsonl").exists()


def test_a_completion_row_is_named_by_its_line(tmp_path):
    from directpo.data.formats import DataError
    from directpo.rlhf.config import RewardModelConfig
    from directpo.rlhf.reward_model import _pairs

    data = str(write_jsonl([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "completion": "c"}],
                           tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: a reward model needs ≥ 2 ranked responses"):
        _pairs(data, None, RewardModelConfig(model="m", data=data, output_dir="o"), "train")
