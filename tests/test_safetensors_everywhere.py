"""Safetensors everywhere: a pickled (.bin-only) checkpoint is refused by the reward model (`directpo
rm`) and by the benchmark's TRL side with the explanation `directpo.models.load_model` gives, not
just "no file named model.safetensors" (nor loaded by `torch.load`)."""
import pytest
import torch

from directpo.cli import main
from directpo.models import load_model
from directpo.toy import review_task, write_jsonl


@pytest.fixture(scope="module")
def bin_only_model(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("bin") / "model"
    model = load_model(str(tiny_model))
    try:  # transformers < 5; from 5 on save_pretrained writes safetensors only: pickle the weights by hand
        model.save_pretrained(out, safe_serialization=False)
    except TypeError:
        model.save_pretrained(out)
    if not (out / "pytorch_model.bin").exists():
        torch.save(model.state_dict(), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(out)
    assert (out / "pytorch_model.bin").exists() and not list(out.glob("*.safetensors"))
    return out


def test_rm_on_a_bin_only_model_exits_2_with_the_explanation(bin_only_model, tmp_path, capsys):
    rows, _ = review_task(n_train=8, n_eval=1, seed=0)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    code = main(["rm", "--model", str(bin_only_model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--max-steps", "1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("directpo rm: error:") and str(bin_only_model) in err
    assert "directpo loads only safetensors (pickled .bin checkpoints can run code)" in err
    assert "save_pretrained" in err
    # the same words as the causal-LM loader
    with pytest.raises(OSError) as lm_error:
        load_model(str(bin_only_model))
    assert str(lm_error.value).split(" (")[0] == err.removeprefix("directpo rm: error: ").split(" (")[0]


def test_bench_trl_side_loads_safetensors_only(bin_only_model, tmp_path):
    pytest.importorskip("trl")
    from directpo.bench.trl import run_trl

    rows, _ = review_task(n_train=8, n_eval=1, seed=0)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    spec = dict(model=str(bin_only_model), data=str(data), batch=2, steps=1, max_length=64, precision="fp32",
                precompute_ref=False, device="cpu", output_dir=str(tmp_path / "trl"))
    with pytest.raises(OSError, match=r"directpo loads only safetensors \(pickled \.bin checkpoints can run code\)"):
        run_trl(spec)
