"""The loss registry: every loss the trainer knows, and all it knows about each, in one place.

`LOSSES` maps a name (`--loss`) to a `LossSpec` that declares
    fn              the loss of a micro-batch: `fn(LossInputs, LossParams) -> RankedLossOutput`
    params          the loss settings it reads (`LOSS_SETTINGS`: fields of both `LossParams` and
                    `TrainConfig`). `TrainConfig.validate` refuses a setting moved from its default
                    that the loss does not read (it would change nothing), the model card lists them.
    chance_loss     its per-example value at initialisation, πθ = πref (every implicit reward 0), on
                    pairs, whatever its parameters: the `no_learning` alarm compares the loss with it.
                    None where that value depends on the parameters (ipo: 1/(4β²); exo_pair: on ε),
                    on the data (kto: on the mix of desirable rows) or there is no πref to equal.
    rows            what one example is: "pairs" (two responses, best first), "rankings" (K ≥ 2
                    responses, best first), "completions" (the best response alone, to imitate),
                    "unpaired" (a completion and a desirable/undesirable label)
    needs_reference, needs_unlikelihood
                    what the trainer computes for it besides the policy's log-probs
    state           what the trainer keeps across batches and passes in `LossParams` (`LOSS_STATE`):
                    "kto_kl" (KTO's reference point z0, over the whole batch), "bco_delta" (BCO's δ,
                    a running mean of the batch-mean implicit rewards)
    help            one line for the command line and the model card

A new loss is one pure function (`directpo.loss_functions`, all re-exported here) and one entry
here, never a branch inside the trainer; `tests/losses/test_registry.py` checks every declaration
against what the function does. "a,b" (`get_loss`) is a weighted sum Σ w_i·L_i per example
(`combine_losses`), declared from its parts, each part's loss reported in
`RankedLossOutput.components`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Re-exported: `directpo.losses` is where users and the trainer import every loss from.
from .errors import UserValueError
from .loss_functions import (EXO_DEFAULT_EPSILON, ORPO_MAX_LOGP, LossOutput, apo_down_loss,  # noqa: F401
                             apo_zero_loss, bco_pair_loss, bradley_terry_loss, cdpo_loss, dpo_loss, dpo_norm_loss,
                             exo_pair_loss, hinge_loss, implicit_reward, ipo_avg_loss, ipo_loss, kto_loss,
                             kto_reference_point, log1mexp, log_odds, nca_pair_loss, orpo_loss, plackett_luce_loss,
                             robust_dpo_loss, sft_loss, simpo_loss, unlikelihood_loss, unlikelihood_terms)

# The settings a loss may read, each a field of `LossParams` and a `TrainConfig` flag, with what it
# is called in the model card's method table.
LOSS_SETTINGS: dict[str, str] = {
    "beta": "β",
    "label_smoothing": "label smoothing / flip rate ε",
    "unlikelihood_weight": "unlikelihood weight α",
    "simpo_gamma": "SimPO margin γ",
    "orpo_lambda": "ORPO weight λ",
    "kto_desirable_weight": "KTO desirable weight λ_D",
    "kto_undesirable_weight": "KTO undesirable weight λ_U",
}
# The `LossParams` fields the trainer sets at each step (never the user): a loss's running state.
LOSS_STATE = ("kto_kl", "bco_delta")
# The shapes of rows. A weighted sum takes the first of its parts' shapes in this order: a pair
# loss needs exactly two responses, a ranking loss takes pairs too, an SFT loss reads response 0.
ROWS = ("unpaired", "pairs", "rankings", "completions")


@dataclass
class LossInputs:
    """What a loss may use, per example, responses best first (NaN where absent)."""

    policy: torch.Tensor  # (B, K) summed response log-probs under πθ
    ref: torch.Tensor | None  # (B, K) under πref, or None for reference-free losses
    lengths: torch.Tensor  # (B, K) response token counts
    unlikelihood: torch.Tensor | None = None  # (B, K) Σ_t −log(1 − p_t), when the loss asks for it
    labels: torch.Tensor | None = None  # (B,) unpaired losses (kto): True where response 0 is desirable


@dataclass
class LossParams:
    """The values of `LOSS_SETTINGS` (which loss reads which: `LossSpec.params`) and `LOSS_STATE`."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # ε: conservative (dpo, cdpo, dpo_norm, reference_free); robust's, exo_pair's
    unlikelihood_weight: float = 1.0
    simpo_gamma: float = 1.0  # SimPO's target reward margin γ (γ/β = 0.5 at the paper's β = 2.0)
    orpo_lambda: float = 0.1  # ORPO's λ, the weight of the odds-ratio term (the paper's 0.1)
    kto_desirable_weight: float = 1.0  # KTO's λ_D
    kto_undesirable_weight: float = 1.0  # KTO's λ_U
    # Set by the trainer at each step, not by the user:
    kto_kl: float | None = None  # KTO's z0 over the whole batch; None: from this call's mismatched column
    bco_delta: float = 0.0  # BCO's δ, the running mean of the batch-mean implicit rewards


@dataclass
class RankedLossOutput:
    losses: torch.Tensor  # (B,)
    rewards: torch.Tensor | None  # (B, K) implicit rewards (None for losses without a reference)
    # combined losses (`combine_losses`): each component's per-example loss, unweighted, detached
    components: dict[str, torch.Tensor] | None = None
    # metric sums over the examples (so micro-batches add up) that only this loss knows, detached.
    # A key "_n/<name>" is the count of examples "<name>" is summed over: the trainer reports
    # "<name>" as the mean over those examples (KTO's rewards of desirable / undesirable examples).
    stats: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class LossSpec:
    """A loss and its declarations (see the module docstring for each field)."""

    fn: Callable[[LossInputs, LossParams], RankedLossOutput]
    params: tuple[str, ...] = ()
    chance_loss: float | None = None
    rows: str = "pairs"
    needs_reference: bool = True
    needs_unlikelihood: bool = False
    state: tuple[str, ...] = ()
    help: str = ""

    def __post_init__(self):  # a misspelt declaration fails on import, not in the middle of a run
        unknown = [n for n in self.params if n not in LOSS_SETTINGS] + [n for n in self.state if n not in LOSS_STATE]
        if unknown or self.rows not in ROWS:
            raise ValueError(f"bad LossSpec declaration: {unknown or self.rows!r}")

    @property
    def pairwise(self) -> bool:
        """Takes exactly two responses per example."""
        return self.rows == "pairs"

    @property
    def unpaired(self) -> bool:
        """Takes unpaired rows (kto): [own completion, mismatched completion] and a label per
        example; the trainer computes the reference point z0 over the whole batch first."""
        return self.rows == "unpaired"

    @property
    def running_mean(self) -> bool:
        """The trainer keeps a running mean of the batch-mean implicit rewards (`LossParams.bco_delta`),
        from the loss's "bco/batch_reward" stat."""
        return "bco_delta" in self.state


# ----------------------------------------------------------------------------------------------
# Adapters: a pure function as a registry `fn`, given exactly the parameters its entry declares.


def _pair(out: LossOutput) -> RankedLossOutput:
    return RankedLossOutput(out.losses, torch.stack([out.chosen_rewards, out.rejected_rewards], 1))


def pair_entry(fn: Callable[..., LossOutput], params: tuple[str, ...], **declared) -> LossSpec:
    """The entry of a plain pairwise function `fn(pc, pr, rc, rr, **params)`. It is passed the
    declared settings and nothing else, so declaring one it does not take fails at its first call
    (no `**kwargs` swallows it) and one it takes but is not declared stays at its own default
    (which the registry test catches: the signature must match the declaration)."""
    def run(x: LossInputs, p: LossParams) -> RankedLossOutput:
        return _pair(fn(x.policy[:, 0], x.policy[:, 1], x.ref[:, 0], x.ref[:, 1],
                        **{name: getattr(p, name) for name in params}))
    return LossSpec(run, params=params, **declared)


def _ipo_avg(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return _pair(ipo_avg_loss(x.policy[:, 0], x.policy[:, 1], x.ref[:, 0], x.ref[:, 1], x.lengths[:, 0],
                              x.lengths[:, 1], beta=p.beta))


def _reference_free(x: LossInputs, p: LossParams) -> RankedLossOutput:
    """DPO with log πref(y|x) = 0: a constant sequence-level reference (not a per-token uniform one)."""
    zeros = torch.zeros_like(x.policy[:, 0])
    return _pair(dpo_loss(x.policy[:, 0], x.policy[:, 1], zeros, zeros, beta=p.beta,
                          label_smoothing=p.label_smoothing))


def _simpo(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return _pair(simpo_loss(x.policy[:, 0], x.policy[:, 1], x.lengths[:, 0], x.lengths[:, 1], beta=p.beta,
                            gamma=p.simpo_gamma))


def _orpo(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return _pair(orpo_loss(x.policy[:, 0], x.policy[:, 1], x.lengths[:, 0], x.lengths[:, 1], beta=p.beta,
                           orpo_lambda=p.orpo_lambda))


def _dpo_norm(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return _pair(dpo_norm_loss(x.policy[:, 0], x.policy[:, 1], x.ref[:, 0], x.ref[:, 1], x.lengths[:, 0],
                               x.lengths[:, 1], beta=p.beta, label_smoothing=p.label_smoothing))


def _plackett_luce(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return RankedLossOutput(*plackett_luce_loss(x.policy, x.ref, p.beta))


def _sft(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return RankedLossOutput(sft_loss(x.policy[:, 0], x.lengths[:, 0]), None)


def _unlikelihood(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return RankedLossOutput(unlikelihood_loss(x.policy[:, 0], x.lengths[:, 0], x.unlikelihood[:, 1],
                                              x.lengths[:, 1], p.unlikelihood_weight), None)


def _kto(x: LossInputs, p: LossParams) -> RankedLossOutput:
    if x.labels is None:
        raise ValueError("the kto loss takes unpaired examples: a desirable/undesirable label each")
    # z0: the trainer's, over the whole batch; else (evaluation, direct calls) this call's own estimate
    z0 = kto_reference_point(x.policy[:, 1], x.ref[:, 1]) if p.kto_kl is None else \
        torch.as_tensor(max(p.kto_kl, 0.0), dtype=x.policy.dtype, device=x.policy.device)
    losses, rewards = kto_loss(x.policy[:, 0], x.ref[:, 0], x.labels, z0, p.beta, p.kto_desirable_weight,
                               p.kto_undesirable_weight)
    good = x.labels.to(torch.bool)
    bad = ~good
    stats = {"kl": z0 * len(losses), "rewards/desirable": rewards[good].sum(), "_n/rewards/desirable": good.sum(),
             "rewards/undesirable": rewards[bad].sum(), "_n/rewards/undesirable": bad.sum()}
    # No (B, K) rewards: the pair metrics (accuracy, margin) mean nothing for unpaired rows.
    return RankedLossOutput(losses, None, stats=stats)


def _bco_pair(x: LossInputs, p: LossParams) -> RankedLossOutput:
    out = bco_pair_loss(x.policy[:, 0], x.policy[:, 1], x.ref[:, 0], x.ref[:, 1], beta=p.beta, delta=p.bco_delta)
    n = len(out.losses)
    # "bco/batch_reward" summed per pair as (r(yw) + r(yl))/2: divided by the batch size it is the
    # batch mean over chosen and rejected that the trainer folds into δ (TRL's torch.cat(...).mean()).
    stats = {"bco/delta": torch.tensor(p.bco_delta * n, dtype=torch.float64),
             "bco/batch_reward": ((out.chosen_rewards + out.rejected_rewards) / 2).sum()}
    return RankedLossOutput(out.losses, torch.stack([out.chosen_rewards, out.rejected_rewards], 1), stats=stats)


# ----------------------------------------------------------------------------------------------
# The registry. Values at initialisation (h = 0, every implicit reward 0): −log σ(0) = ln 2 for the
# DPO family, whatever ε (its two label terms are equal there); 1 − 0 = 1 for the hinge; 1 − ½ + ½ = 1
# and ½ + 1 − ½ = 1 for APO; −log σ(0) − ½·2·log σ(0) = 2 ln 2 for NCA; 2 ln 2 for BCO (δ = 0: the
# running mean of rewards that are all 0); ln 2 for Plackett–Luce on pairs (on rankings of K: ln K!).

LN2 = math.log(2)
BETA, SMOOTHED = ("beta",), ("beta", "label_smoothing")

LOSSES: dict[str, LossSpec] = {
    "dpo": pair_entry(dpo_loss, SMOOTHED, chance_loss=LN2,
                    help="DPO, eq. 7 (label_smoothing > 0: conservative DPO)"),
    "cdpo": pair_entry(cdpo_loss, SMOOTHED, chance_loss=LN2,
                     help="conservative DPO, ε = label_smoothing (default 0.1)"),
    "ipo": pair_entry(ipo_loss, BETA,  # 1/(4β²) at πθ = πref
                    help="IPO (Azar et al.): squared margin regression to 1/(2β), summed log-probs (TRL averages "
                         "per token: see ipo_avg)"),
    "ipo_avg": LossSpec(_ipo_avg, params=BETA,
                        help="IPO on per-token average log-probs (TRL's form; β means what it means there)"),
    "hinge": pair_entry(hinge_loss, BETA, chance_loss=1.0, help="SLiC hinge on the implicit reward margin"),
    "reference_free": LossSpec(_reference_free, params=SMOOTHED, needs_reference=False,
                               help="DPO with a constant sequence-level reference (log πref(y|x) = 0; "
                                    "label_smoothing > 0: conservative)"),
    "plackett_luce": LossSpec(_plackett_luce, params=BETA, chance_loss=LN2, rows="rankings",
                              help="ranking DPO over K ≥ 2 responses (A.3/A.5)"),
    "sft": LossSpec(_sft, rows="completions", needs_reference=False, help="supervised NLL of the best response"),
    "unlikelihood": LossSpec(_unlikelihood, params=("unlikelihood_weight",), needs_reference=False,
                             needs_unlikelihood=True,
                             help="the paper's Unlikelihood baseline: per-token mean NLL(yw) + α·per-token mean "
                                  "−log(1 − p) over yl"),
    "simpo": LossSpec(_simpo, params=("beta", "simpo_gamma"), needs_reference=False,
                      help="SimPO (Meng et al. 2024): −log σ(β·log πθ(yw)/|yw| − β·log πθ(yl)/|yl| − γ), no "
                           "reference; γ = simpo_gamma; use β ≈ 2 (the paper's 2.0–2.5), not DPO's 0.1"),
    # (β is not in ORPO's loss: it scales the rewards ORPO reports, so it is read all the same)
    "orpo": LossSpec(_orpo, params=("beta", "orpo_lambda"), needs_reference=False,
                     help="ORPO (Hong et al. 2024): per-token NLL(yw) + λ·−log σ(log odds(yw) − log odds(yl)), "
                          "odds from per-token mean log-probs, no reference; λ = orpo_lambda; rewards β·mean "
                          "log-prob"),
    "dpo_norm": LossSpec(_dpo_norm, params=SMOOTHED, chance_loss=LN2,
                         help="length-normalised DPO (LN-DPO, Ahrabian et al. 2024): DPO on per-token mean "
                              "log-ratios (label_smoothing > 0: conservative)"),
    "robust": pair_entry(robust_dpo_loss, SMOOTHED, chance_loss=LN2,
                       help="robust DPO (Chowdhury et al. 2024): unbiased DPO under labels flipped at rate "
                            "ε = label_smoothing < 0.5; not bounded below"),
    "apo_zero": pair_entry(apo_zero_loss, BETA, chance_loss=1.0,
                         help="APO-zero (D'Oosterlinck et al. 2024): 1 − σ(r(yw)) + σ(r(yl)); chosen up, rejected "
                              "down, each anchored at the reference (chosen better than the model's own outputs)"),
    "apo_down": pair_entry(apo_down_loss, BETA, chance_loss=1.0,
                         help="APO-down (D'Oosterlinck et al. 2024): σ(r(yw)) + 1 − σ(r(yw) − r(yl)); both down, "
                              "rejected more (chosen worse than the model's own outputs)"),
    "exo_pair": pair_entry(exo_pair_loss, SMOOTHED,  # −ln 2 − ½·ln(ε(1 − ε)) at πθ = πref
                         help="EXO on pairs (Ji et al. 2024): reverse KL from (σ(βh), σ(−βh)) to the labels "
                              "(1 − ε, ε), ε = label_smoothing (1e-3 when 0)"),
    "nca_pair": pair_entry(nca_pair_loss, BETA, chance_loss=2 * LN2,
                         help="NCA on pairs (Chen et al. 2024): −log σ(r(yw)) − ½log σ(−r(yw)) − ½log σ(−r(yl)); "
                              "keeps the chosen likelihood from falling"),
    "kto": LossSpec(_kto, params=("beta", "kto_desirable_weight", "kto_undesirable_weight"),  # λ/2 per row there
                    rows="unpaired", state=("kto_kl",),
                    help="KTO (Ethayarajh et al. 2024) on unpaired rows (prompt, completion, label): "
                         "λ_D·(1 − σ(β(r − z0))) for desirable, λ_U·(1 − σ(β(z0 − r))) for undesirable, z0 = "
                         "max(0, batch mean of log πθ/πref on mismatched prompt/completion pairs), detached"),
    "bco_pair": LossSpec(_bco_pair, params=BETA, chance_loss=2 * LN2, state=("bco_delta",),
                         help="BCO on pairs (Jung et al. 2024): −log σ(r(yw) − δ) − log σ(−(r(yl) − δ)), δ the "
                              "running mean of the batch-mean implicit rewards (kept by the trainer)"),
}

# The plain pairwise functions, for users who call them directly.
PAIRWISE_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo_loss, "cdpo": cdpo_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_dpo_loss,
    "apo_zero": apo_zero_loss, "apo_down": apo_down_loss, "exo_pair": exo_pair_loss, "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss}


def _registered(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise UserValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}, or a comma list of them "
                             "(a weighted sum)") from None


def _check_weights(names: list[str], weights: list[float]) -> None:
    if not names:
        raise UserValueError("a combined loss needs at least one loss")
    if len(weights) != len(names):
        raise UserValueError(f"{len(names)} losses ({','.join(names)}) but {len(weights)} weights")
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise UserValueError(f"loss {twice!r} appears twice in a combined loss: give it one weight instead")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise UserValueError(f"loss weights must be finite, ≥ 0 and not all 0, got {weights}")


def combine_losses(names: Sequence[str], weights: Sequence[float] | None = None) -> LossSpec:
    """A weighted sum of registered losses as one LossSpec: per example Σ_i w_i·L_i (weights 1 when
    None). Its output's `rewards` are those of the first component that has rewards, and its
    `components` maps each name to that component's per-example loss, unweighted (detached, for
    logging). Every component sees the same LossParams (one β, one label_smoothing). A component of
    weight 0 is computed and reported but not added (so its inf or NaN cannot reach the sum). The
    components' `stats` are merged. An unpaired loss (kto) cannot be combined: it has no pairs for
    the others.

    Its declarations are its parts': it reads the union of their settings, needs the reference or
    the unlikelihood terms if any part does, keeps every part's state, takes the rows of `ROWS`'
    first part shape, and its value at initialisation is Σ w_i·chance_i (None if an added part has
    none).
    """
    names = [n.strip() for n in names]
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    _check_weights(names, weights)
    specs = [_registered(n) for n in names]
    unpaired = next((n for n, s in zip(names, specs) if s.unpaired), None)
    if unpaired is not None and len(names) > 1:  # its rows are single completions: the others have no pairs
        raise UserValueError(f"loss {unpaired!r} takes unpaired rows and cannot be summed with other losses")

    def run(x: LossInputs, p: LossParams) -> RankedLossOutput:
        total, rewards, components, stats = None, None, {}, {}
        for name, w, spec in zip(names, weights, specs):
            out = spec.fn(x, p)
            components[name] = out.losses.detach()
            stats.update(out.stats or {})
            if w:
                total = w * out.losses if total is None else total + w * out.losses
            if rewards is None and out.rewards is not None:
                rewards = out.rewards
        return RankedLossOutput(total, rewards, components, stats or None)

    added = [(w, s) for w, s in zip(weights, specs) if w]
    chance = None if any(s.chance_loss is None for _, s in added) else sum(w * s.chance_loss for w, s in added)
    return LossSpec(run, params=tuple(n for n in LOSS_SETTINGS if any(n in s.params for s in specs)),
                    chance_loss=chance, rows=next(r for r in ROWS if any(s.rows == r for s in specs)),
                    needs_reference=any(s.needs_reference for s in specs),
                    needs_unlikelihood=any(s.needs_unlikelihood for s in specs),
                    state=tuple(n for n in LOSS_STATE if any(n in s.state for s in specs)),
                    help="weighted sum " + " + ".join(f"{w:g}·{n}" for n, w in zip(names, weights)))


def parse_loss_weights(text: str) -> list[float] | None:
    """"1,0.5" -> [1.0, 0.5]; "" -> None (weights 1 each)."""
    if not text.strip():
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserValueError(f"loss weights must be a comma list of numbers, got {text!r}") from None


def get_loss(name: str, weights: Sequence[float] | str | None = None) -> LossSpec:
    """The LossSpec of `name`: a registered loss ("dpo"), or a comma list of them ("dpo,sft"), which
    is `combine_losses` of those losses with `weights` (numbers, or a comma string "1,0.5"), 1 each
    when None or "". Weights given with a single name make a one-component sum (the loss scaled,
    with its `components` reported)."""
    if isinstance(weights, str):
        weights = parse_loss_weights(weights)
    if "," not in name and weights is None:
        return _registered(name)
    return combine_losses(name.split(","), weights)


def get_pairwise_loss(name: str) -> Callable[..., LossOutput]:
    try:
        return PAIRWISE_LOSSES[name]
    except KeyError:
        raise UserValueError(f"unknown loss {name!r}; choose one of {sorted(PAIRWISE_LOSSES)}") from None
