"""The final model of an FSDP run, streamed (#17): `export_model` writes what `save_pretrained`
writes, byte for byte, gathering one tensor at a time and appending it to the file being written.

In one process: the shard plan is huggingface_hub's; the files (names, tensor names and values,
index, safetensors metadata, configs) are those `save_pretrained` writes for the same model; no
more than one gathered tensor is ever alive. Under torchrun (gloo, 2 CPU
processes, the export's shard size made tiny): the run's model, split over several files, loads
with `from_pretrained` and equals bit for bit the weights its last checkpoint gathered whole."""
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from directpo import safetensors_io
from directpo.toy import review_task, write_jsonl
from directpo.training import export
from directpo.training.distributed import Dist
from directpo.training.export import export_model, plan_shards, shard_files

SHARD = 40_000  # bytes: the tiny model's embedding and LM head (74.6 kB each) get files of their own
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def test_the_shard_plan_is_huggingface_hubs():
    from huggingface_hub import split_torch_state_dict_into_shards

    # the rule: a tensor never split, a new file when the next tensor would pass the maximum, a
    # larger tensor alone in its file (placed before the file being filled)
    assert plan_shards([("a", 6), ("b", 6), ("c", 2), ("d", 6), ("e", 2), ("f", 2)], 10) == [
        ["a"], ["b", "c"], ["d", "e", "f"]]
    assert plan_shards([("a", 3), ("b", 12), ("c", 3)], 10) == [["b"], ["a", "c"]]
    state = {f"t{i}": torch.zeros(n) for i, n in enumerate([3, 5, 2, 9, 1, 4, 4, 12, 2, 6, 6, 10, 1])}
    sizes = [(k, t.numel() * t.element_size()) for k, t in state.items()]
    for max_bytes in (4, 40, 44, 48, 400):
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_bytes)
        plan = plan_shards(sizes, max_bytes)
        assert plan == list(split.filename_to_tensors.values()), max_bytes
        assert shard_files(len(plan)) == list(split.filename_to_tensors), max_bytes


def _tensors(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_the_export_is_what_save_pretrained_writes(model, tmp_path):
    from transformers import AutoModelForCausalLM

    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    model.save_pretrained(theirs, max_shard_size=SHARD)
    export_model(model, ours, Dist(), max_shard_bytes=SHARD)
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    assert sum(n.endswith(".safetensors") for n in names) >= 4  # several files, two of them oversized
    index = json.loads((ours / export.INDEX_NAME).read_text())
    assert index == json.loads((theirs / export.INDEX_NAME).read_text())
    state = model.state_dict()  # (the rotary inv_freq buffers are not persistent: not in it, not saved)
    assert sorted(index["weight_map"]) == sorted(state)  # every tensor, once
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name in names:
        if name.endswith(".safetensors"):
            (meta, ts), (their_meta, their_ts) = _tensors(ours / name), _tensors(theirs / name)
            assert meta == their_meta == {"format": "pt"}
            assert ts.keys() == their_ts.keys() and all(torch.equal(ts[k], their_ts[k]) for k in ts)
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name  # byte for byte
        else:
            assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    loaded, info = AutoModelForCausalLM.from_pretrained(ours, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())

    # by default one file, as save_pretrained's default; the earlier shards and index are gone
    export_model(model, ours, Dist())
    assert sorted(p.name for p in ours.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert load_file(str(ours / "model.safetensors")).keys() == state.keys()


def test_one_gathered_tensor_at_a_time(model, tmp_path, monkeypatch):
    """Each gather is stood in for by a copy (a real all-gather makes new memory too), tracked until
    it is freed: the bytes alive at once never pass the largest tensor's, though the default export
    puts the whole model (281 kB) in one file."""
    alive: dict[int, int] = {}
    peak, gathered = [0], []
    real = export.whole_tensor

    def tracked(t):
        whole = real(t).clone()
        alive[id(whole)] = whole.numel() * whole.element_size()
        weakref.finalize(whole, alive.pop, id(whole))
        peak[0] = max(peak[0], sum(alive.values()))
        gathered.append(whole.numel())
        return whole

    monkeypatch.setattr(export, "whole_tensor", tracked)
    export_model(model, tmp_path / "out", Dist())
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[-1] == "model.safetensors"  # one file
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    assert len(gathered) == len(sizes)  # every tensor went through the stand-in
    assert peak[0] == max(sizes) < sum(sizes) / 3
    assert not alive  # and nothing is kept afterwards


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def test_a_streamed_safetensors_file_is_save_files_byte_for_byte(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.{dt}".replace("torch.", ""): (torch.randn(2, 3, generator=g) * 50).to(dt)
               for i, dt in enumerate(DTYPES)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["a.scalar"] = torch.tensor(3.5)
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    entries = sorted(tensors.items(), key=lambda e: safetensors_io.data_order(e[0], e[1].dtype))
    writer = export.SafetensorsStream([(n, t.dtype, tuple(t.shape)) for n, t in entries])
    with export._replaced(tmp_path / "ours.safetensors", writer.open):
        for _, t in entries:
            writer.append(t)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_a_stream_cut_short_or_fed_the_wrong_tensor_leaves_no_file(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    target = tmp_path / "m.safetensors"
    writer = export.SafetensorsStream(entries)
    with pytest.raises(RuntimeError, match="1 tensors of the file were never written"):
        with export._replaced(target, writer.open):
            writer.append(torch.zeros(2))
    writer = export.SafetensorsStream(entries)
    with pytest.raises(ValueError, match=r"b: expected torch.float32 \(3,\), got torch.float32 \(4,\)"):
        with export._replaced(target, writer.open):
            writer.append(torch.zeros(2))
            writer.append(torch.zeros(4))
    assert writer.file.closed
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    with pytest.raises(ValueError, match="complex64"):
        export.SafetensorsStream([("c", torch.complex64, (1,))])


LAUNCH = """import sys
from directpo.training import export
export.MAX_SHARD_BYTES = int(sys.argv[1])  # the default export_model reads at call time
from directpo.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_an_fsdp_runs_model_is_streamed_into_several_files_equal_to_the_gathered_weights(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    rows, _ = review_task(n_train=40, n_eval=8, seed=21)
    (tmp_path / "launch.py").write_text(LAUNCH)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model), "--data", str(write_jsonl(rows, tmp_path / "d.jsonl")), "--lr", "1e-2",
            "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "2",
            "--warmup-steps", "0", "--max-length", "64", "--save-every", "2", "--no-progress", "--threads", "1",
            "--ref-cache", "off", "--fsdp", "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([*TORCHRUN, str(tmp_path / "launch.py"), str(SHARD), *argv], capture_output=True, text=True,
                       check=False, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "run_complete.json").exists() and (out / "tokenizer.json").exists()
    weight_map = json.loads((out / export.INDEX_NAME).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) >= 4 and not (out / "model.safetensors").exists()
    # the names save_pretrained gave the same architecture's tensors (the fixture's own file)
    assert sorted(weight_map) == sorted(load_file(str(tiny_model / "model.safetensors")))
    ours = {k: t for f in files for k, t in load_file(str(out / f)).items()}
    # the same run's final weights gathered whole onto rank 0 the old way (its last checkpoint)
    gathered = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert ours.keys() == gathered.keys() and all(torch.equal(ours[k], gathered[k]) for k in ours)
    start = load_file(str(tiny_model / "model.safetensors"))
    assert not all(torch.equal(ours[k], start[k]) for k in ours)  # it trained
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(t, ours[k]) for k, t in loaded.state_dict().items() if k in ours)
