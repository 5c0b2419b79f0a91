"""`--fsdp` with a vision-language model (issue #30): the model built on the meta device as
AutoModelForImageTextToText, the language model's blocks and the vision side (tower + projector,
frozen) sharded over 2 CPU processes (gloo), each rank reading its shards from the checkpoint's files
under the family's original tensor names. The run equals one process's, its export reloads with
`from_pretrained` and gives the trained state's log-probs, and it resumes exactly."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from directpo.toy import COLOURS, build_tiny_vlm, colour_image_task

TEXTS = [f"What colour is this picture? It is {c}." for c in COLOURS] * 8
STEPS = 4
FSDP = ["--nproc", "2", "--fsdp"]


def _cli(argv):
    p = subprocess.run([sys.executable, "-m", "directpo", *argv], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stderr


class _Runs:
    """The runs of one tiny VLM family on the colour task, each made once: "one" (1 process),
    "fsdp" (2 processes, --fsdp), "cut" (--fsdp, stopped after 2 steps, then resumed)."""

    def __init__(self, root, family):
        self.root, self.made = root, {}
        self.model = build_tiny_vlm(root / family, family, TEXTS, seed=0)
        self.train, self.eval = colour_image_task(root / "colours", n_train=32, n_eval=8, seed=0)

    def argv(self, out, steps, *extra):
        # an evaluation at the last step: the trained state's log-probs, computed by the sharded model
        return ["train", "--model", str(self.model), "--data", str(self.train), "--output-dir", str(self.root / out),
                "--lr", "1e-3", "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "4",
                "--max-steps", str(steps), "--warmup-steps", "1", "--save-every", "1", "--no-progress",
                "--threads", "1", "--ref-cache", "off", "--precision", "fp32", "--eval-data", str(self.eval), "--eval-every", str(STEPS),
                *extra]

    def run(self, out):
        if out not in self.made:
            rc, err = _cli(self.argv(out, STEPS, *([] if out == "one" else FSDP)))
            assert rc == 0, err
            self.made[out] = self.root / out
        return self.made[out]

    def weights(self, out):
        return load_file(str(self.run(out) / "model.safetensors"))


@pytest.fixture(scope="module", params=["qwen2_vl", pytest.param("llava", marks=pytest.mark.slow)])
def runs(request, tmp_path_factory):
    return _Runs(tmp_path_factory.mktemp(f"fsdp_{request.param}"), request.param)


def test_fsdp_on_two_processes_equals_one_process(runs):
    """The final weights of `--fsdp --nproc 2` are one process's within 1e-5 (float re-association
    of the sharded reductions), under the same tensor names; the frozen vision side is untouched,
    bit for bit (read from the files under their original names, never updated)."""
    one, fsdp = runs.weights("one"), runs.weights("fsdp")
    assert one.keys() == fsdp.keys()
    for k in one:
        assert torch.allclose(one[k], fsdp[k], atol=1e-5, rtol=0), (k, (one[k] - fsdp[k]).abs().max())
    start = load_file(str(runs.model / "model.safetensors"))
    assert start.keys() == fsdp.keys()
    vision = [k for k in start if "visual" in k or "vision_tower" in k or "multi_modal_projector" in k]
    assert vision and all(torch.equal(start[k], fsdp[k]) for k in vision)
    trained = [k for k in start if k not in vision]
    assert all(not torch.equal(start[k], fsdp[k]) for k in trained if k.endswith("proj.weight"))


def test_fsdp_export_reloads_with_from_pretrained(runs):
    """The streamed export loads with AutoModelForImageTextToText.from_pretrained (no missing or
    unexpected tensor) and with the processor saved beside it, and its log-probs on the held-out
    pairs (`directpo score`, which loads it that way) are those the sharded model computed at the
    last step."""
    import directpo
    from transformers import AutoModelForImageTextToText

    from directpo.vision import load_processor

    out = runs.run("fsdp")
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == json.loads((runs.model / "config.json").read_text())["architectures"][0]
    assert load_processor(str(out)).tokenizer is not None
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final_eval = next(r for r in reversed(last) if r.get("split") == "eval")
    assert final_eval["step"] == STEPS
    directpo.score(model=str(out), data=str(runs.eval), out=str(runs.root / "scores.jsonl"),
                   precision="fp32")
    rows = [json.loads(line) for line in (runs.root / "scores.jsonl").read_text().splitlines()]
    chosen = sum(r["chosen_logp"] for r in rows) / len(rows)
    rejected = sum(r["rejected_logp"] for r in rows) / len(rows)
    assert chosen == pytest.approx(final_eval["logps/chosen"], abs=1e-5)
    assert rejected == pytest.approx(final_eval["logps/rejected"], abs=1e-5)


@pytest.mark.slow  # (two more 2-process runs: about 35 s on a busy 2-core machine)
def test_fsdp_vlm_run_resumes_exactly(runs):
    """Stopped after 2 of 4 steps and resumed (`--resume`, its full-format checkpoint broadcast back
    to the shards), an --fsdp VLM run ends with the weights of an uninterrupted one, bit for bit."""
    rc, err = _cli(runs.argv("cut", 2, *FSDP))
    assert rc == 0, err
    rc, err = _cli(runs.argv("cut", STEPS, *FSDP, "--resume"))
    assert rc == 0, err
    assert "resumed from" in err
    a, b = runs.weights("fsdp"), load_file(str(runs.root / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_refuses_rows_without_images_in_one_line(tmp_path):
    """A row without an image would skip the vision tower on one rank alone (its FSDP unit's
    gathers would not pair up across ranks: the processes abort): refused before anything loads,
    naming the file and row; the same data without --fsdp is accepted."""
    from directpo.data.errors import DataError
    from directpo.training import TrainConfig
    from directpo.training.prepare import prepare_data
    from directpo.training.vlm import run_processor

    model = build_tiny_vlm(tmp_path / "qwen", "qwen2_vl", TEXTS, seed=0)
    train, _ = colour_image_task(tmp_path / "colours", n_train=4, n_eval=1, seed=0)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    bare = rows[2]
    del bare["images"]
    bare["prompt"][0]["content"] = [c for c in bare["prompt"][0]["content"] if c["type"] != "image"]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fsdp in (False, True):
        cfg = TrainConfig(model=str(model), data=str(train), fsdp=fsdp)
        processor = run_processor(cfg)  # a VLM with --fsdp is no longer refused as such
        assert processor is not None
        if not fsdp:
            assert len(prepare_data(str(train), processor.tokenizer, cfg, "train", processor)[0]) == 4
            continue
        with pytest.raises(DataError) as e:
            prepare_data(str(train), processor.tokenizer, cfg, "train", processor)
        assert "line 3" in str(e.value) and "--fsdp" in str(e.value) and "\n" not in str(e.value)
