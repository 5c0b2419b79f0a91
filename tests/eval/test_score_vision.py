"""`directpo score` on image pairs with a vision-language model (issue #30): the rows' images go
through the processor as in training, so score's log-probs are training's reference-table values;
a text-only model (or reference) is refused in one line before anything loads."""
import json

import pytest
import torch

from directpo.errors import UserValueError
from directpo.eval.score import score
from directpo.toy import COLOURS, build_tiny_vlm, colour_image_task

TEXTS = [f"What colour is this picture? It is {c}." for c in COLOURS] * 8


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """Two Qwen2-VLs with one tokenizer (policy, reference: different random weights) and a LLaVA."""
    qwen = build_tiny_vlm(tmp_path_factory.mktemp("qwen_a"), "qwen2_vl", TEXTS, seed=0)
    qwen_ref = build_tiny_vlm(tmp_path_factory.mktemp("qwen_b"), "qwen2_vl", TEXTS, seed=1)
    llava = build_tiny_vlm(tmp_path_factory.mktemp("llava"), "llava", TEXTS, seed=0)
    return {"qwen2_vl": qwen, "qwen_ref": qwen_ref, "llava": llava}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return colour_image_task(tmp_path_factory.mktemp("colours"), n_train=6, n_eval=1, seed=0)[0]


def _training_logps(model_dir, data, layout, batch_size):
    """What a training run's reference table holds for `data`: its tokenization (`prepare_data`
    with the run's processor) and `dataset_logps` with the run's collate."""
    from directpo.data import make_collate
    from directpo.logprobs import dataset_logps, packed_row_tokens
    from directpo.training import TrainConfig
    from directpo.training.prepare import prepare_data
    from directpo.training.vlm import run_processor
    from directpo.vision import load_vision_model

    cfg = TrainConfig(model=str(model_dir), data=str(data), max_length=512, layout=layout)
    processor = run_processor(cfg)
    tokenized, _, _ = prepare_data(cfg.data, processor.tokenizer, cfg, "train", processor)
    model = load_vision_model(str(model_dir))
    collate = make_collate(layout, processor.tokenizer.pad_token_id, packed_row_tokens(None, model))
    return dataset_logps(model, tokenized, collate, batch_size, torch.device("cpu"))


@pytest.mark.parametrize("family,layout", [("qwen2_vl", "packed"), ("llava", "padded")])
def test_score_equals_training_reference_logps(vlms, pairs, tmp_path, one_thread, family, layout):
    out = tmp_path / "scores.jsonl"
    result = score(str(vlms[family]), str(pairs), str(out), batch_size=4, device="cpu", layout=layout)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    want = _training_logps(vlms[family], pairs, layout, batch_size=4)
    assert result["pairs"] == len(lines) == want.shape[0] == 6
    got = torch.tensor([[r["chosen_logp"], r["rejected_logp"]] for r in lines], dtype=want.dtype)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
    assert all(r["chosen_logp"] < 0 and r["rejected_logp"] < 0 for r in lines)


def test_score_with_a_vision_reference_gives_implicit_rewards(vlms, pairs, tmp_path, one_thread):
    out = tmp_path / "scores.jsonl"
    beta = 0.5
    result = score(str(vlms["qwen2_vl"]), str(pairs), str(out), ref=str(vlms["qwen_ref"]), beta=beta,
                   batch_size=8, device="cpu")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ref = _training_logps(vlms["qwen_ref"], pairs, "packed", batch_size=8)
    got_ref = torch.tensor([[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in lines], dtype=ref.dtype)
    assert torch.allclose(got_ref, ref, rtol=0, atol=1e-6)
    for r in lines:
        assert r["chosen_reward"] == pytest.approx(beta * (r["chosen_logp"] - r["ref_chosen_logp"]), abs=1e-5)
        assert r["rejected_reward"] == pytest.approx(beta * (r["rejected_logp"] - r["ref_rejected_logp"]), abs=1e-5)
    assert r["chosen_logp"] != r["ref_chosen_logp"]  # two different models: the rewards are not all zero
    margins = [r["chosen_reward"] - r["rejected_reward"] for r in lines]
    assert result["implicit_reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))


def test_text_only_model_or_reference_refused_in_one_line(vlms, pairs, tiny_model, tmp_path):
    out = tmp_path / "s.jsonl"
    cases = [(dict(model=str(tiny_model)), f"--model {tiny_model} is a text-only model"),
             (dict(model=str(vlms["qwen2_vl"]), ref=str(tiny_model)), f"--ref {tiny_model} is a text-only model")]
    for kwargs, says in cases:
        with pytest.raises(UserValueError) as e:
            score(data=str(pairs), out=str(out), device="cpu", **kwargs)
        msg = str(e.value)
        assert msg.startswith(f"images in {pairs} (6 rows), but {says}: give a vision-language model")
        assert "\n" not in msg
    assert not out.exists()


def test_cli_score_reads_image_pairs(vlms, pairs, tmp_path, capsys):
    from directpo.cli import main

    out = tmp_path / "s.jsonl"
    assert main(["score", "--model", str(vlms["llava"]), "--data", str(pairs), "--out", str(out),
                 "--precision", "fp32", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["pairs"] == 6 and len(out.read_text().splitlines()) == 6
