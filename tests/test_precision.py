"""`--precision auto`: the decision (CUDA, fast-bf16 CPU, AVX2 CPU, the env pin), its per-machine
cache, and what a run records and keeps on resume. The probe and the device are mocked: these
tests must give the same answers on every kind of machine."""
import json
import os
import sys

import pytest
import torch

from directpo import precision as P


@pytest.fixture
def decide_here(monkeypatch, tmp_path):
    """The decision logic on its own: no pin, an empty cache of its own, no earlier decision."""
    monkeypatch.delenv(P.ENV_PIN, raising=False)
    monkeypatch.setenv("DIRECTPO_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "_decided", {})
    monkeypatch.setattr(P, "cpu_identity", lambda: {"cpu": "Test CPU", "flags": ["avx2"], "isa": "AVX2",
                                                   "torch": torch.__version__})
    probes = []

    def probe(result):
        def run(*a, **kw):
            probes.append(result)
            return result
        monkeypatch.setattr(P, "probe_matmul_gflops", run)
    return probe, probes


def test_a_fast_bf16_cpu_gets_bf16(decide_here, monkeypatch):
    probe, probes = decide_here
    monkeypatch.setattr(P, "cpu_identity", lambda: {"cpu": "EPYC 9004", "flags": ["avx512_bf16", "avx512f"],
                                                   "isa": "AVX512", "torch": torch.__version__})
    probe((160.0, 400.0))  # the machine: bf16 matmul 2.5× fp32
    precision, reason = P.resolve_precision("auto", "cpu")
    assert precision == "bf16" and "2.5× faster" in reason and "avx512_bf16" in reason
    assert len(probes) == 1


def test_an_avx2_cpu_gets_fp32(decide_here):
    probe, _ = decide_here
    probe((58.0, 1.2))  # this project's AVX2 machines: bf16 emulated, ~50× slower
    precision, reason = P.resolve_precision("auto", "cpu")
    assert precision == "fp32" and "not ≥ 1.3× faster" in reason


def test_the_margin():
    assert P.decide(100.0, 129.0, {})[0] == "fp32"  # faster, but not by the margin
    assert P.decide(100.0, 130.0, {})[0] == "bf16"


def test_cuda_with_native_bf16_gets_bf16(decide_here, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert P.resolve_precision("auto", torch.device("cuda", 0)) == ("bf16", "Test GPU computes bf16 natively")
    monkeypatch.setattr(P, "_decided", {})
    # a GPU that only emulates bf16 (pre-Ampere): emulation does not count
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert P.resolve_precision("auto", torch.device("cuda", 0))[0] == "fp32"


def test_a_cached_decision_is_not_probed_again(decide_here, monkeypatch):
    probe, probes = decide_here
    probe((160.0, 400.0))
    assert P.resolve_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(P, "_decided", {})  # a new process on the same machine
    monkeypatch.setattr(P, "probe_matmul_gflops", lambda *a, **kw: pytest.fail("probed despite the cache"))
    precision, reason = P.resolve_precision("auto", "cpu")
    assert precision == "bf16" and reason.endswith("(cached)")
    assert len(probes) == 1


def test_another_torch_or_cpu_is_probed_again(decide_here, monkeypatch):
    probe, probes = decide_here
    probe((58.0, 1.2))
    assert P.resolve_precision("auto", "cpu")[0] == "fp32"
    monkeypatch.setattr(P, "_decided", {})
    monkeypatch.setattr(P, "cpu_identity", lambda: {"cpu": "Test CPU", "flags": ["amx_bf16", "avx2"],
                                                   "isa": "AVX512", "torch": torch.__version__})
    probe((160.0, 400.0))
    assert P.resolve_precision("auto", "cpu")[0] == "bf16"
    assert len(probes) == 2
    assert len(json.loads(P.cache_path().read_text())) == 2  # one entry per machine kind


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": "v"}', ""])
def test_a_corrupt_cache_is_probed_again_not_a_crash(decide_here, content):
    probe, probes = decide_here
    P.cache_path().parent.mkdir(parents=True, exist_ok=True)
    P.cache_path().write_text(content)
    probe((58.0, 1.2))
    assert P.resolve_precision("auto", "cpu")[0] == "fp32"
    assert len(probes) == 1
    entry, = [v for v in json.loads(P.cache_path().read_text()).values() if isinstance(v, dict)]
    assert entry["precision"] == "fp32"  # and the file is whole again


def test_a_tampered_cache_entry_is_probed_again(decide_here):
    probe, probes = decide_here
    probe((58.0, 1.2))
    P.resolve_precision("auto", "cpu")
    data = json.loads(P.cache_path().read_text())
    data = {k: {**v, "precision": "fp16"} for k, v in data.items()}
    P.cache_path().write_text(json.dumps(data))
    P._decided.clear()
    assert P.resolve_precision("auto", "cpu")[0] == "fp32" and len(probes) == 2


def test_the_env_pin_decides_auto_only(decide_here, monkeypatch):
    probe, probes = decide_here
    probe((58.0, 1.2))
    monkeypatch.setenv(P.ENV_PIN, "bf16")
    assert P.resolve_precision("auto", "cpu") == ("bf16", f"{P.ENV_PIN}=bf16")
    assert P.resolve_precision("fp32", "cpu") == ("fp32", "requested")  # an explicit choice stays
    assert not probes
    monkeypatch.setenv(P.ENV_PIN, "fp16")
    with pytest.raises(ValueError, match=f"{P.ENV_PIN}='fp16': set it to fp32 or bf16") as e:
        P.resolve_precision("auto", "cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="choose one of auto, fp32, bf16"):
        P.resolve_precision("fp16", "cpu")


def test_the_test_suite_pins_fp32():
    """conftest.py pins auto to fp32: the exactness tests hold on CPUs with fast bf16 too."""
    assert os.environ.get(P.ENV_PIN) == "fp32"


def test_the_probe_runs_and_leaves_the_global_rng_alone(monkeypatch):
    for name in P.ONEDNN_CACHES:
        monkeypatch.delenv(name, raising=False)
    state = torch.get_rng_state()
    fp32, bf16 = P.probe_matmul_gflops(shape=(64, 64, 64), reps=1)
    assert fp32 > 0 and bf16 > 0
    assert torch.equal(torch.get_rng_state(), state)
    # both caches bounded before the first bf16 matmul
    assert {n: os.environ[n] for n in P.ONEDNN_CACHES} == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128",
                                                          "LRU_CACHE_CAPACITY": "128"}


def test_the_onednn_cache_bounds_respect_the_users_own(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    P.resolve_precision("bf16", "cpu")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7" and os.environ["LRU_CACHE_CAPACITY"] == "128"
    for name in P.ONEDNN_CACHES:
        monkeypatch.delenv(name)
    P.resolve_precision("fp32", "cpu")  # fp32 never reaches oneDNN's matmuls: nothing set
    assert not set(P.ONEDNN_CACHES) & set(os.environ)


@pytest.mark.skipif(not (sys.platform == "linux" and torch.backends.mkldnn.is_available()),
                    reason="needs oneDNN and /proc")
def test_bounded_onednn_caches_stop_the_growth_of_new_matmul_shapes():
    """What the bounds are for: primitives compiled for shapes used once pile up in both caches.
    (fp32 through ideep's inner product here: bf16's matmul takes the same caches on CPUs with
    native bf16, which this machine may lack.) Once 200 shapes have filled the bounded caches, 300
    more grow the default process by hundreds of MiB and the bounded one by next to nothing."""
    from directpo.bench.onednn import growth_mib

    grown = {mode: growth_mib(range(400, 700), warm=range(200, 400), setting=mode)
             for mode in ("library defaults", "directpo (both caches 128)")}
    assert grown["library defaults"] > 3 * grown["directpo (both caches 128)"] + 50, grown


# ----------------------------------------------------------------------------------------------
# bf16 accuracy, and what a training run records


def test_bf16_log_probs_within_1e_2_of_fp32_per_sequence(tiny_model, tiny_tokenizer, one_thread):
    """Summed response log-probs under bf16 autocast against fp32, per sequence. Absolute bound
    1e-2 (the issue's): the tiny model's sequences sum 20-300 token log-probs of about −6 each;
    bf16 rounds the matmul inputs (8 bits of mantissa) while the residual stream, the LM head's
    log-softmax and the sums stay fp32, so per-token errors are ~1e-5 and their sum stays near
    1e-3. (On bigger models the error is better read relative: ~1e-4 of the sum on the `small`
    bench fixture.)"""
    from directpo.data import collate_packed, parse_row, tokenize_example
    from directpo.logprobs import example_logps
    from directpo.models import autocast_ctx, load_model

    from conftest import hh_rows

    model = load_model(str(tiny_model))
    exs = [tokenize_example(parse_row(r, "hh", i), tiny_tokenizer, max_length=256) for i, r in enumerate(hh_rows(6))]
    batch = collate_packed(exs, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        fp32 = example_logps(model, batch)
        with autocast_ctx("cpu", "bf16"):
            bf16 = example_logps(model, batch)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # bf16 did run
    assert (bf16 - fp32).abs().max() < 1e-2


def _train_cfg(tiny_model, tmp_path, **kw):
    from directpo.toy import review_task, write_jsonl
    from directpo.training import TrainConfig

    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(review_task(n_train=16, n_eval=4, seed=1)[0], data)
    base = dict(model=str(tiny_model), data=str(data), output_dir=str(tmp_path / "run"), batch_size=4,
                micro_batch_size=4, max_steps=2, warmup_steps=0, progress=False, max_length=48, save_every=1)
    return TrainConfig(**{**base, **kw})


def test_a_run_records_auto_and_what_it_resolved_to_and_resume_keeps_it(tiny_model, tmp_path, monkeypatch,
                                                                         one_thread):
    from directpo.training import train

    train(_train_cfg(tiny_model, tmp_path))  # auto, pinned to fp32 by conftest
    rec = json.loads((tmp_path / "run" / "directpo_config.json").read_text())
    assert (rec["precision"], rec["precision_resolved"], rec["precision_reason"]) == \
        ("auto", "fp32", f"{P.ENV_PIN}=fp32")
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("*2/state.json")).read_text())
    assert state["config"]["precision"] == "fp32"  # checkpoints hold what the run computed in

    # The same run resumed where auto would now pick bf16: it keeps the fp32 it started with.
    monkeypatch.setenv(P.ENV_PIN, "bf16")
    train(_train_cfg(tiny_model, tmp_path, max_steps=3, resume="latest"))
    rec = json.loads((tmp_path / "run" / "directpo_config.json").read_text())
    assert rec["precision_resolved"] == "fp32" and "checkpoint" in rec["precision_reason"]
    # An explicit other precision is refused, as any other trajectory-changing setting.
    with pytest.raises(ValueError, match="precision: 'fp32' -> 'bf16'"):
        train(_train_cfg(tiny_model, tmp_path, max_steps=4, resume="latest", precision="bf16"))
