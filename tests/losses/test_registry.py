"""Every registered loss against its declarations (`directpo.losses.LossSpec`), checked on what the
pure functions do on small fp64 tensors: the settings it reads (moving one it declares changes its
output, moving any other changes nothing), its running state, its value at initialisation
(πθ = πref), its rows, what it needs besides the policy; then the one-line refusal of a setting
the chosen loss does not read, before anything loads."""
import inspect
import math
from dataclasses import fields

import pytest
import torch

from directpo.cli import main
from directpo.loss_functions import ipo_loss
from directpo.losses import (LOSS_SETTINGS, LOSS_STATE, LOSSES, PAIRWISE_LOSSES, ROWS, LossInputs, LossParams,
                             get_loss)
from directpo.training.config import TrainConfig

B = 6
F64 = torch.float64
# Each setting away from its default, and moved again (both in range for every loss that reads it).
BASE = dict(beta=0.3, label_smoothing=0.2, unlikelihood_weight=0.7, simpo_gamma=0.4, orpo_lambda=0.25,
            kto_desirable_weight=1.3, kto_undesirable_weight=0.8)
MOVED = dict(beta=0.45, label_smoothing=0.3, unlikelihood_weight=1.5, simpo_gamma=0.9, orpo_lambda=0.6,
             kto_desirable_weight=0.6, kto_undesirable_weight=1.7)
LABELS = torch.tensor([True, False, True, True, False, False])


def _inputs(seed: int, k: int = 2, rows: str = "pairs", same: bool = False) -> LossInputs:
    """B examples of k responses: summed log-probs with per-token means in (−3, −0.05), lengths
    1–11, positive unlikelihood sums; πref = πθ when `same`; labels for unpaired rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (B, k), generator=g).to(F64)
    policy = (-0.05 - 2.95 * torch.rand(B, k, generator=g, dtype=F64)) * lengths
    ref = policy.clone() if same else (-0.05 - 2.95 * torch.rand(B, k, generator=g, dtype=F64)) * lengths
    unlikelihood = 3 * torch.rand(B, k, generator=g, dtype=F64)
    return LossInputs(policy, ref, lengths, unlikelihood, LABELS.clone() if rows == "unpaired" else None)


def _k(spec) -> int:
    return 3 if spec.rows == "rankings" else 2


def _outputs(spec, x: LossInputs, p: LossParams) -> list[torch.Tensor]:
    """Everything a loss returns: losses, rewards, stats (by key)."""
    out = spec.fn(x, p)
    stats = [torch.as_tensor(out.stats[k], dtype=F64) for k in sorted(out.stats or {})]
    return [out.losses] + ([out.rewards] if out.rewards is not None else []) + stats


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


# ---- the settings and the state a loss reads -------------------------------------------------

def test_the_settings_are_loss_params_and_train_flags_with_the_same_defaults():
    """A setting "at its default" means the same to the loss and to the command line."""
    params = {f.name: f.default for f in fields(LossParams)}
    assert list(params) == list(LOSS_SETTINGS) + list(LOSS_STATE)
    flags = {f.name: f.default for f in fields(TrainConfig)}
    for name in LOSS_SETTINGS:
        assert flags[name] == params[name], name


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_reads_exactly_the_settings_it_declares(name):
    spec = LOSSES[name]
    x = _inputs(1, _k(spec), spec.rows)
    base = _outputs(spec, x, LossParams(**BASE))
    for setting in LOSS_SETTINGS:
        moved = _outputs(spec, x, LossParams(**{**BASE, setting: MOVED[setting]}))
        assert _same(base, moved) == (setting not in spec.params), f"{name}: {setting}"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_reads_exactly_the_running_state_it_declares(name):
    spec = LOSSES[name]
    x = _inputs(2, _k(spec), spec.rows)
    for state, a, b in (("kto_kl", 0.1, 0.5), ("bco_delta", 0.0, 0.2)):
        changed = not _same(_outputs(spec, x, LossParams(**BASE, **{state: a})),
                            _outputs(spec, x, LossParams(**BASE, **{state: b})))
        assert changed == (state in spec.state), f"{name}: {state}"
    assert spec.running_mean == ("bco_delta" in spec.state) and spec.unpaired == (spec.rows == "unpaired")


def test_each_plain_pairwise_function_takes_exactly_its_declared_settings():
    """The pair entries pass a function exactly its declared settings: a parameter of the function
    left undeclared would silently stay at the function's default, so the signatures must match;
    and no function swallows unknown keywords (ipo once took --label-smoothing and ignored it)."""
    as_state = {"delta": "bco_delta"}
    for name, fn in PAIRWISE_LOSSES.items():
        sig = inspect.signature(fn).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in sig.values()), name
        taken = {as_state.get(p, p) for p in list(sig)[4:]}  # after (pc, pr, rc, rr)
        assert taken == set(LOSSES[name].params) | set(LOSSES[name].state), name
    z = torch.zeros(1, dtype=F64)
    with pytest.raises(TypeError):
        ipo_loss(z, z, z, z, beta=0.1, label_smoothing=0.1)


# ---- the value at initialisation --------------------------------------------------------------

DRAWS = [(3, dict(BASE)), (4, dict(MOVED)), (5, dict(beta=2.0, label_smoothing=0.0, kto_desirable_weight=2.0)),
         (6, dict(beta=0.05, label_smoothing=0.45, simpo_gamma=0.0, orpo_lambda=1.0, unlikelihood_weight=0.1))]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_declared_chance_loss_is_the_loss_of_a_policy_equal_to_its_reference(name):
    """On pairs, whatever the inputs and the settings: every example's loss is `chance_loss`; a
    loss declared without one (None) really has no fixed value there."""
    spec = LOSSES[name]
    values = torch.cat([spec.fn(_inputs(seed, 2, spec.rows, same=True), LossParams(**p)).losses for seed, p in DRAWS])
    if spec.chance_loss is not None:
        assert torch.allclose(values, torch.full_like(values, spec.chance_loss), rtol=0, atol=1e-12), values
    else:
        assert values.max() - values.min() > 1e-6, f"{name} has a fixed value {values[0]:.6g}: declare it"


def test_plackett_luce_on_a_ranking_of_k_starts_at_ln_k_factorial():
    """(Its declared chance loss is the pairs' ln 2; on rankings of K it is ln K!, see the registry.)"""
    out = LOSSES["plackett_luce"].fn(_inputs(7, 4, same=True), LossParams(beta=0.3))
    assert torch.allclose(out.losses, torch.full((B,), math.log(24), dtype=F64), atol=1e-12)


@pytest.mark.parametrize("loss, weights, chance", [("dpo,hinge", "1,0.5", math.log(2) + 0.5),
                                                   ("dpo,nca_pair", "", 3 * math.log(2)),
                                                   ("dpo,sft", "", None),
                                                   ("dpo,sft", "2,0", 2 * math.log(2))])  # sft not added
def test_a_weighted_sum_starts_at_the_weighted_sum_of_its_parts(loss, weights, chance):
    spec = get_loss(loss, weights)
    assert spec.chance_loss == (pytest.approx(chance, abs=1e-15) if chance is not None else None)
    if chance is not None:
        out = spec.fn(_inputs(8, same=True), LossParams())
        assert torch.allclose(out.losses, torch.full((B,), chance, dtype=F64), atol=1e-12)


def test_a_weighted_sum_declares_what_its_parts_do():
    spec = get_loss("plackett_luce,sft,unlikelihood")
    assert spec.params == ("beta", "unlikelihood_weight") and spec.rows == "pairs"
    assert spec.needs_reference and spec.needs_unlikelihood and spec.state == ()
    assert get_loss("plackett_luce,sft").rows == "rankings" and get_loss("sft", "2").rows == "completions"
    assert get_loss("dpo,bco_pair").state == ("bco_delta",) and get_loss("kto", "1").rows == "unpaired"


# ---- rows, and what a loss needs besides the policy ------------------------------------------

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_declared_rows_are_what_the_loss_takes(name):
    spec = LOSSES[name]
    assert spec.rows in ROWS and spec.pairwise == (spec.rows == "pairs")
    p = LossParams(**BASE)
    x = _inputs(9, 3, spec.rows)
    first_two = LossInputs(x.policy[:, :2], x.ref[:, :2], x.lengths[:, :2], x.unlikelihood[:, :2], x.labels)
    if spec.rows == "rankings":  # reads a third response; a NaN one (a shorter ranking) is no response
        assert not _same(_outputs(spec, x, p), _outputs(spec, first_two, p))
        padded = LossInputs(*(torch.cat([t[:, :2], torch.full((B, 1), math.nan, dtype=F64)], 1) for t in
                              (x.policy, x.ref, x.lengths, x.unlikelihood)))
        assert torch.equal(spec.fn(padded, p).losses, spec.fn(first_two, p).losses)
    elif spec.rows == "completions":  # reads the first (best) response alone
        one = LossInputs(x.policy[:, :1], x.ref[:, :1], x.lengths[:, :1], x.unlikelihood[:, :1])
        assert _same(_outputs(spec, x, p), _outputs(spec, one, p))
    else:  # pairs; unpaired rows are [own completion, mismatched completion]: two columns either way
        assert _same(_outputs(spec, x, p), _outputs(spec, first_two, p))
        other = [t.clone() for t in (x.policy, x.lengths, x.unlikelihood)]  # another second response
        for t in other:
            t[:, 1] += 1.0
        assert not _same(_outputs(spec, x, p), _outputs(spec, LossInputs(other[0], x.ref, other[1], other[2],
                                                                         x.labels), p))
    if spec.rows == "unpaired":  # needs its labels, and reads them
        with pytest.raises(ValueError, match="unpaired"):
            spec.fn(LossInputs(x.policy, x.ref, x.lengths), p)
        flipped = LossInputs(x.policy, x.ref, x.lengths, x.unlikelihood, ~x.labels)
        assert not _same(_outputs(spec, x, p), _outputs(spec, flipped, p))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_needs_reference_and_unlikelihood_are_what_the_loss_reads(name):
    spec = LOSSES[name]
    p, x = LossParams(**BASE), _inputs(10, _k(spec), spec.rows)
    other_ref = LossInputs(x.policy, x.ref - 1.0 - x.ref.abs(), x.lengths, x.unlikelihood, x.labels)
    if spec.needs_reference:
        assert not _same(_outputs(spec, x, p), _outputs(spec, other_ref, p))
    else:
        assert _same(_outputs(spec, x, p), _outputs(spec, LossInputs(x.policy, None, x.lengths, x.unlikelihood,
                                                                     x.labels), p))
    if spec.needs_unlikelihood:
        assert not _same(_outputs(spec, x, p),
                         _outputs(spec, LossInputs(x.policy, x.ref, x.lengths, 2 * x.unlikelihood, x.labels), p))
    else:
        assert _same(_outputs(spec, x, p), _outputs(spec, LossInputs(x.policy, x.ref, x.lengths, None, x.labels), p))


# ---- a setting the loss does not read is refused before anything loads -----------------------

def _train_argv(tmp_path, *flags: str) -> list[str]:
    return ["train", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "no-such.jsonl"),
            "--output-dir", str(tmp_path / "out"), *flags]


@pytest.mark.parametrize("command, flags, message", [
    ("train", ["--loss", "ipo", "--label-smoothing", "0.1"],
     "--label-smoothing: the 'ipo' loss does not read it (it reads --beta)"),
    ("train", ["--loss", "dpo,sft", "--simpo-gamma", "0.5"],
     "--simpo-gamma: the 'dpo,sft' loss does not read it (it reads --beta, --label-smoothing)"),
    ("train", ["--loss", "kto", "--label-smoothing", "0.1"], "--label-smoothing: the 'kto' loss does not read it"),
    ("sft", ["--beta", "0.5"], "--beta: the 'sft' loss does not read it (it reads none of the loss settings)"),
])
def test_an_unread_setting_is_a_one_line_error_before_anything_loads(tmp_path, capsys, command, flags, message):
    argv = _train_argv(tmp_path, *flags)
    argv[0] = command
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"directpo {command}: error: {message}"), lines
    assert not (tmp_path / "out").exists()  # refused before the run claimed its folder


@pytest.mark.parametrize("settings", [dict(loss="ipo", label_smoothing=0.0),  # at its default: fine
                                      dict(loss="dpo,sft", beta=0.3, label_smoothing=0.1),  # dpo's, in the union
                                      dict(loss="simpo", beta=2.0, simpo_gamma=0.5),
                                      dict(loss="unlikelihood", unlikelihood_weight=0.5, sft_weight=0.1),
                                      dict(loss="kto", beta=0.2, kto_desirable_weight=1.2)])
def test_settings_the_loss_reads_are_accepted(tmp_path, settings):
    TrainConfig(model="m", data="d.jsonl", output_dir=str(tmp_path / "o"), **settings).validate()


def test_the_pipeline_sft_stage_is_not_refused_for_the_dpo_stage_settings(tmp_path, monkeypatch):
    """The pipeline's SFT stage is built from the user's (DPO-stage) config: the loss settings SFT
    does not read go back to their defaults, the DPO stage keeps them."""
    from directpo.training import pipeline

    ran = []

    def fake_train(cfg):
        cfg.validate()  # what train() does first
        ran.append(cfg)
        (tmp_path / "out" / ("sft" if cfg.loss == "sft" else "dpo")).mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / ("sft" if cfg.loss == "sft" else "dpo") / "run_complete.json").write_text("{}")
        return {}

    monkeypatch.setattr(pipeline, "train", fake_train)
    cfg = TrainConfig(model="m", data="d.jsonl", output_dir=str(tmp_path / "out"), loss="robust", beta=0.3,
                      label_smoothing=0.2)
    assert pipeline.run_pipeline(cfg) == {"sft": {}, "dpo": {}}
    sft, dpo = ran
    assert (sft.loss, sft.beta, sft.label_smoothing) == ("sft", 0.1, 0.0)
    assert (dpo.loss, dpo.beta, dpo.label_smoothing) == ("robust", 0.3, 0.2)
    assert pipeline.SFT_UNREAD == set(LOSS_SETTINGS) <= pipeline.SFT_UNUSED  # sft reads none of them
    bad = TrainConfig(model="m", data="d.jsonl", output_dir=str(tmp_path / "bad"), loss="ipo", label_smoothing=0.1)
    ran.clear()
    with pytest.raises(ValueError, match="'ipo' loss does not read"):
        pipeline.run_pipeline(bad)  # refused before the SFT stage ran
    assert ran == []


# ---- the registry's readers: the health alarm, the model card, the data preparation ----------

def test_the_no_learning_alarm_compares_with_the_registry_value():
    from directpo.training.alarms import CHANCE_LOSS, HealthMonitor

    assert CHANCE_LOSS == {n: s.chance_loss for n, s in LOSSES.items() if s.chance_loss is not None}
    assert HealthMonitor("apo_zero").chance_loss == 1.0 and HealthMonitor("ipo").chance_loss is None
    assert HealthMonitor("rm").chance_loss is None and HealthMonitor("ppo").chance_loss is None
    assert HealthMonitor("dpo,hinge", loss_weights="1,0.5").chance_loss == pytest.approx(math.log(2) + 0.5)
    assert HealthMonitor("dpo,hinge").chance_loss is None  # weights not known: no value to compare with
    assert HealthMonitor("ipo", chance_loss=1.0).chance_loss == 1.0  # given: it wins


def test_the_model_card_lists_the_settings_the_loss_reads():
    from directpo.training.card import method_rows, method_section

    def rows(**s):
        return dict(method_rows({"command": "train", "beta": 0.2, **s}))

    assert rows(loss="reference_free", label_smoothing=0.1)["label smoothing / flip rate ε"] == 0.1  # (was missing)
    assert "label smoothing / flip rate ε" not in rows(loss="dpo", label_smoothing=0.0)  # 0: the loss's default
    kto = rows(loss="kto", kto_desirable_weight=1.2, kto_undesirable_weight=1.0)
    assert kto["KTO desirable weight λ_D"] == 1.2 and kto["KTO undesirable weight λ_U"] == 1.0
    assert "β" not in rows(loss="unlikelihood", unlikelihood_weight=0.5)  # it does not read β
    assert rows(loss="dpo,simpo", simpo_gamma=0.5)["SimPO margin γ"] == 0.5
    text = method_section({"command": "train", "loss": "dpo,sft", "loss_weights": "1,0.5"})
    assert LOSSES["dpo"].help in text and LOSSES["sft"].help in text


def test_the_rows_a_run_prepares_follow_the_declared_shape():
    from directpo.data.formats import Example
    from directpo.training.prepare import preference_rows

    ranked = [Example("p", ["a", "b", "c"], "f.jsonl", 1)]
    for loss, weights, kept in (("sft", "", 1), ("sft", "2", 1), ("plackett_luce,sft", "", 3)):
        cfg = TrainConfig(model="m", data="d", output_dir="o", loss=loss, loss_weights=weights)
        assert [len(ex.responses) for ex in preference_rows(ranked, cfg, get_loss(loss, weights))] == [kept]
    cfg = TrainConfig(model="m", data="d", output_dir="o", loss="dpo,sft")
    with pytest.raises(ValueError, match="takes pairs"):
        preference_rows(ranked, cfg, get_loss("dpo,sft"))
