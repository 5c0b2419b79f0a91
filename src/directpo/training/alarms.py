"""Health alarms on the metrics a run already computes: pure, no I/O.

A `HealthMonitor` is fed each `metrics.jsonl` record as it is made (`observe_train` for a training
step, `observe_eval` for an evaluation; `observe` picks by the record's "split"; `annotate` also
puts the alerts on the record as "alerts") and returns the `Alert`s that the record raised: one
line each, saying what is seen, with numbers, and what to try.
It only looks at the keys a record has, so the same monitor serves DPO and its family (implicit
rewards), SFT (loss, nll/token only), the reward model ("accuracy") and PPO ("length_mean").

The alarms (`ALARMS`) and their settings (constructor arguments):

    both_rewards_falling  the chosen implicit reward β·log πθ/πref(yw) is below 0 and falling while
                          the margin grows: the model widens the gap by making *both* responses
                          less likely, the chosen one included (the known DPO failure). "Falling"
                          and "grows" compare the older and the newer half of the last `window`
                          steps with a two-sample t statistic (|t| ≥ `trend_t`), and the chosen
                          reward's fall must be at least `chosen_drop_share` of the margin's gain,
                          so noise and negligible drifts stay quiet. Not for "rm"/"ppo", whose
                          rewards are not implicit ones.
    overfitting           checked at each evaluation: train accuracy ≥ `overfit_accuracy` on average
                          over the last `window` steps, the train margin still climbing (t ≥
                          `trend_t`), and on held-out data either the loss rose at each of the last
                          `overfit_evals` evaluations or the accuracy of those evaluations is no
                          better than the best one before them (+ `eval_accuracy_tol`), that best
                          short of 1 (an accuracy at its ceiling cannot improve).
    no_learning           from step `no_learning_steps` on, every loss of the last
                          min(`window`, `no_learning_steps`) steps is within `no_learning_tol` of
                          the loss of an untrained policy: the loss's `chance_loss` in the registry
                          (`directpo.losses.LOSSES`: ln 2 for dpo/cdpo/plackett_luce on pairs, 1 for
                          hinge, 2 ln 2 for bco_pair, ...; Σ w·chance for a comma list when its
                          `loss_weights` are given), or `chance_loss` when given. Losses without a
                          fixed value (ipo, whose depends on β; sft; kto, whose depends on the mix
                          of desirable rows; rm, ppo, ...) leave the alarm off.
    grad_spike            a step's gradient norm (before clipping) above `grad_spike` × the median
                          of the previous `window` steps' (after at least `min_history` of them).
    loss_jump             a step's loss above `loss_jump` × the median of the previous `window`
                          steps' losses, and at least `min_loss_jump` above it (so that a DPO loss
                          near 0 going from 1e-4 to 1e-3 is no alarm); only for positive losses.
    length_drift          runs that sample (PPO's "length_mean"): the median of the last `window`
                          mean lengths more than `length_drift` (a fraction) away from the first
                          step's mean length.
    dead_gradients        the model died: the gradient norm exactly 0 on each of the last
                          `dead_steps` steps, or (given `vocab_size` V) the chosen responses' NLL
                          per token within `dead_tol`·ln V of ln V on each of them, which only a
                          policy that went uniform gives (a random initialisation is off by far
                          more). Nothing more can be learned: one of the `FATAL` alarms, which
                          stop the run (unless --no-stop-on-alarm).

Each alarm fires when its condition turns true, then stays silent while it holds; once it has
been false at `rearm_after` consecutive checks (training steps; evaluations for overfitting) it
may fire again. `rearm_after=None`: each alarm fires at most once per run. A check that cannot be
made yet (window not full, keys absent) counts neither way. A resumed run starts a fresh monitor;
`replay` the records kept in metrics.jsonl to warm it up (the alerts it returns were already
reported).
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable

from ..errors import UserValueError
from ..losses import LOSSES, get_loss

__all__ = ["ALARMS", "CHANCE_LOSS", "FATAL", "Alert", "HealthMonitor", "registered_chance_loss"]

ALARMS = ("both_rewards_falling", "overfitting", "no_learning", "grad_spike", "loss_jump", "length_drift",
          "dead_gradients")
FATAL = frozenset({"dead_gradients"})  # the run cannot recover: it stops (`Alert.fatal`)

# The loss of a policy equal to its reference (every implicit reward 0), by loss name: the
# registry's declarations, the losses that have a fixed one.
CHANCE_LOSS = {name: spec.chance_loss for name, spec in LOSSES.items() if spec.chance_loss is not None}

NO_IMPLICIT_REWARDS = frozenset({"rm", "ppo"})  # their "rewards/..." are a reward model's, not β·log-ratios
ACCURACY_KEYS = ("rewards/accuracies", "accuracy")  # DPO family; reward model


@dataclass
class Alert:
    """One alarm raised at one step; `message`: one line, what is seen (numbers) and what to try."""

    name: str
    step: int
    message: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def fatal(self) -> bool:
        return self.name in FATAL

    def __str__(self) -> str:
        return f"health alarm {self.name} at step {self.step}: {self.message}"


class _Latch:
    """Fires on a false -> true edge; re-arms after `rearm_after` consecutive false checks."""

    def __init__(self, rearm_after: int | None):
        self.rearm_after, self.fired, self.clear = rearm_after, False, 0

    def check(self, condition: bool) -> bool:
        if condition:
            self.clear = 0
            fire, self.fired = not self.fired, True
            return fire
        if self.fired and self.rearm_after is not None:
            self.clear += 1
            if self.clear >= self.rearm_after:
                self.fired, self.clear = False, 0
        return False


def _halves(values: list[float]) -> tuple[float, float, float]:
    """(mean of the older half, mean of the newer half, Welch t of newer − older)."""
    n = len(values) // 2
    old, new = values[:n], values[-n:]
    a, b = statistics.fmean(old), statistics.fmean(new)
    se = math.sqrt(statistics.variance(old) / n + statistics.variance(new) / n)
    if se > 0:
        return a, b, (b - a) / se
    return a, b, math.copysign(math.inf, b - a) if b != a else 0.0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def registered_chance_loss(loss_name: str, loss_weights: str | None = None) -> float | None:
    """The registry's value of the loss at initialisation (`LossSpec.chance_loss`; a comma list:
    Σ w·chance of its parts); None where it has none, for a comma list whose weights are not known,
    and for what is not a registered loss ("rm", "ppo")."""
    if loss_weights is None:
        if "," in loss_name:
            return None
        loss_weights = ""
    try:
        return get_loss(loss_name, loss_weights).chance_loss
    except ValueError:
        return None


class HealthMonitor:
    """Watches a run's metrics records; `observe_train`/`observe_eval` return the alerts raised.

    `loss_name`: the loss (`--loss`: dpo, ipo, sft, dpo,sft, ...), or "rm" / "ppo" for those trainers;
    `loss_weights`: a comma list's `--loss-weights` ("": 1 each; None: not known, so a comma list
    has no value at initialisation to compare with). Thresholds: see the module docstring; every
    default is what the alarm is documented with."""

    def __init__(self, loss_name: str = "dpo", window: int = 20, *, min_history: int = 5, trend_t: float = 2.0,
                 chosen_drop_share: float = 0.1, overfit_accuracy: float = 0.98, overfit_evals: int = 2,
                 eval_accuracy_tol: float = 0.005, no_learning_steps: int = 50, no_learning_tol: float = 1e-3,
                 chance_loss: float | None = None, grad_spike: float = 10.0, loss_jump: float = 5.0,
                 min_loss_jump: float = 0.1, length_drift: float = 0.5, rearm_after: int | None = 20,
                 dead_steps: int = 5, vocab_size: int | None = None, dead_tol: float = 1e-5,
                 loss_weights: str | None = None):
        if window < 4:
            raise UserValueError(f"window must be ≥ 4 steps (two halves of ≥ 2 to compare), got {window}")
        if overfit_evals < 1 or no_learning_steps < 1 or min_history < 1:
            raise UserValueError("overfit_evals, no_learning_steps and min_history must be ≥ 1")
        self.loss_name, self.window, self.min_history, self.trend_t = loss_name, window, min_history, trend_t
        self.chosen_drop_share = chosen_drop_share
        self.overfit_accuracy, self.overfit_evals, self.eval_accuracy_tol = (overfit_accuracy, overfit_evals,
                                                                             eval_accuracy_tol)
        self.no_learning_steps, self.no_learning_tol = no_learning_steps, no_learning_tol
        self.chance_loss = chance_loss if chance_loss is not None else registered_chance_loss(loss_name,
                                                                                               loss_weights)
        self.grad_spike, self.loss_jump, self.min_loss_jump = grad_spike, loss_jump, min_loss_jump
        self.length_drift = length_drift
        self.dead_steps, self.dead_tol = dead_steps, dead_tol
        self.uniform_nll = math.log(vocab_size) if vocab_size else None
        self._dead_run = 0  # consecutive steps that looked dead
        self._latches = {name: _Latch(rearm_after) for name in ALARMS}
        self._train: dict[str, deque] = {}  # key -> (step, value) of the last `window` steps that had it
        self._evals: list[dict] = []  # step, loss, accuracy of every evaluation
        self._first_length: tuple[int, float] | None = None
        self.raised: list[Alert] = []  # every alert so far

    # -- feeding -----------------------------------------------------------------------------

    def observe(self, metrics: dict) -> list[Alert]:
        """A metrics.jsonl record of either kind: evaluations have "split": "eval"."""
        return self.observe_eval(metrics) if metrics.get("split") == "eval" else self.observe_train(metrics)

    def annotate(self, record: dict) -> list[Alert]:
        """`observe` the record, and when it raised alerts put them on it as `"alerts"`: a list of
        `Alert.to_dict()`, so that the metrics.jsonl line carries them. Returns the alerts."""
        alerts = self.observe(record)
        if alerts:
            record["alerts"] = [a.to_dict() for a in alerts]
        return alerts

    def replay(self, records: Iterable[dict]) -> list[Alert]:
        """Feed records in order (e.g. the lines of a metrics.jsonl); every alert they raise."""
        return [a for r in records for a in self.observe(r)]

    def observe_train(self, metrics: dict) -> list[Alert]:
        step = int(metrics.get("step", 0))
        g, loss = metrics.get("grad_norm"), metrics.get("loss")
        verdicts = [("grad_spike", self._spike(g, "grad_norm")),  # against the steps before this one
                    ("loss_jump", self._jump(loss)), ("dead_gradients", self._dead(step, metrics))]
        self._push(step, metrics)
        verdicts += [("no_learning", self._no_learning(step)), ("both_rewards_falling", self._rewards_falling()),
                     ("length_drift", self._length_drift(step))]
        return self._fire(step, verdicts)

    def observe_eval(self, metrics: dict) -> list[Alert]:
        step = int(metrics.get("step", 0))
        acc = next((metrics[k] for k in ACCURACY_KEYS if _finite(metrics.get(k))), None)
        loss = metrics.get("loss") if _finite(metrics.get("loss")) else None
        self._evals.append({"step": step, "loss": loss, "accuracy": acc})
        return self._fire(step, [("overfitting", self._overfitting())])

    def _push(self, step: int, metrics: dict) -> None:
        keys = ["loss", "grad_norm", "rewards/chosen", "rewards/margins", "length_mean"]
        acc_key = next((k for k in ACCURACY_KEYS if k in metrics), None)
        for key in keys + ([acc_key] if acc_key else []):
            if _finite(metrics.get(key)):
                name = "accuracy" if key == acc_key else key
                self._train.setdefault(name, deque(maxlen=self.window)).append((step, float(metrics[key])))
        if self._first_length is None and _finite(metrics.get("length_mean")):
            self._first_length = (step, float(metrics["length_mean"]))

    def _fire(self, step: int, verdicts: list[tuple[str, str | None]]) -> list[Alert]:
        """verdict: None = cannot tell yet (no check), "" = checked and clear, else the message."""
        out = []
        for name, verdict in verdicts:
            if verdict is not None and self._latches[name].check(bool(verdict)):
                out.append(Alert(name, step, verdict))
        self.raised += out
        return out

    def _values(self, key: str) -> list[float]:
        return [v for _, v in self._train.get(key, ())]

    def _full(self, *keys: str) -> bool:
        return all(len(self._train.get(k, ())) == self.window for k in keys)

    # -- the alarms: each returns None (cannot tell), "" (clear) or the message ---------------

    def _spike(self, g, key: str) -> str | None:
        past = self._values(key)
        if not _finite(g) or len(past) < self.min_history:
            return None
        med = statistics.median(past)
        if med > 0 and g > self.grad_spike * med:
            return (f"gradient norm {g:.3g} is {g / med:.0f}× the median {med:.3g} of the last {len(past)} steps: "
                    "a bad batch or a learning rate at the edge of stability; look at this step's batch, lower "
                    "--lr, lengthen --warmup-steps or lower --max-grad-norm")
        return ""

    def _jump(self, loss) -> str | None:
        past = self._values("loss")
        if not _finite(loss) or len(past) < self.min_history:
            return None
        med = statistics.median(past)
        if med > 0 and loss > self.loss_jump * med and loss - med >= self.min_loss_jump:
            return (f"loss {loss:.4g} jumped to {loss / med:.1f}× the median {med:.4g} of the last {len(past)} steps: "
                    "the run may be destabilising or this batch is unlike the others; look at this step's batch "
                    "(mislabelled or very long pairs), lower --lr or lengthen --warmup-steps")
        return ""

    def _no_learning(self, step: int) -> str | None:
        k = min(self.window, self.no_learning_steps)
        losses = self._values("loss")[-k:]
        if self.chance_loss is None or step < self.no_learning_steps or len(losses) < k:
            return None
        worst = max(abs(v - self.chance_loss) for v in losses)
        if worst > self.no_learning_tol:
            return ""
        margins = self._values("rewards/margins")[-k:]
        margin = f", mean margin {statistics.fmean(margins):.2g}" if margins else ""
        return (f"after {step} steps the loss is still {losses[-1]:.4f}, within {self.no_learning_tol:g} of "
                f"{self.chance_loss:.4f} (a policy equal to its reference) on each of the last {k} steps{margin}: "
                "nothing is learned; check that --lr is not too low, that the weights are trainable (LoRA target "
                "modules, frozen layers), and that the response labels are not all masked (truncation, prompt length)")

    def _rewards_falling(self) -> str | None:
        if self.loss_name in NO_IMPLICIT_REWARDS or not self._full("rewards/chosen", "rewards/margins"):
            return None
        c_old, c_new, t_c = _halves(self._values("rewards/chosen"))
        m_old, m_new, t_m = _halves(self._values("rewards/margins"))
        falling = (c_new < 0 and t_c <= -self.trend_t and t_m >= self.trend_t
                   and c_old - c_new >= self.chosen_drop_share * (m_new - m_old))
        if not falling:
            return ""
        steps = [s for s, _ in self._train["rewards/chosen"]]
        half = self.window // 2
        return (f"chosen reward fell {c_old:.3g} → {c_new:.3g} (mean of steps {steps[0]}–{steps[half - 1]} → "
                f"{steps[-half]}–{steps[-1]}) while the margin grew {m_old:.3g} → {m_new:.3g}: the gap widens by "
                "making the chosen responses less likely too; try --sft-weight (e.g. 0.5), a larger --beta, "
                "or fewer steps")

    def _overfitting(self) -> str | None:
        n = self.overfit_evals
        if len(self._evals) < n + 1 or not self._full("accuracy", "rewards/margins"):
            return None
        train_acc = statistics.fmean(self._values("accuracy"))
        m_old, m_new, t_m = _halves(self._values("rewards/margins"))
        if train_acc < self.overfit_accuracy or t_m < self.trend_t:
            return ""
        seen = self._eval_stall(self._evals[-(n + 1):], n)
        if not seen:
            return ""
        best = min((e for e in self._evals if e["loss"] is not None), key=lambda e: e["loss"], default=None)
        keep = f" (held-out loss was lowest, {best['loss']:.4g}, at step {best['step']})" if best else ""
        return (f"train accuracy {train_acc:.2f} over the last {self.window} steps and the train margin still "
                f"climbing ({m_old:.3g} → {m_new:.3g}), but {seen}: the model is memorising the training pairs; "
                f"stop earlier{keep}, use more data or fewer epochs, a larger --beta or a lower --lr")

    def _eval_stall(self, last: list[dict], n: int) -> str:
        """What the held-out metrics show, or "" when they still improve."""
        losses = [e["loss"] for e in last]
        if None not in losses and all(b > a for a, b in zip(losses, losses[1:])):
            trail = " → ".join(f"{v:.4g}" for v in losses)
            return f"the held-out loss rose at each of the last {n} evaluations ({trail})"
        accs = [e["accuracy"] for e in self._evals]
        if None in accs:
            return ""
        before = max(accs[:-n])
        # at the ceiling (every held-out pair ranked right) accuracy cannot improve: not a stall; a
        # rising held-out loss (above) still is one
        if max(accs[-n:]) <= before + self.eval_accuracy_tol and before < 1 - self.eval_accuracy_tol:
            s = next(e["step"] for e in self._evals if e["accuracy"] == before)
            return (f"held-out accuracy has not improved over the last {n} evaluations "
                    f"({' → '.join(f'{a:.3f}' for a in accs[-n:])}; best {before:.3f} at step {s})")
        return ""

    def _dead(self, step: int, metrics: dict) -> str | None:
        g, nll = metrics.get("grad_norm"), metrics.get("nll/token")
        zero = g == 0 and _finite(g)
        uniform = self.uniform_nll is not None and _finite(nll) and \
            abs(nll - self.uniform_nll) <= self.dead_tol * self.uniform_nll
        if not (_finite(g) or _finite(nll)):
            return None
        self._dead_run = self._dead_run + 1 if zero or uniform else 0
        if self._dead_run < self.dead_steps:
            return ""
        seen = ("the gradient norm was exactly 0" if zero else
                f"the NLL per token of the chosen responses was {nll:.6g} = ln {round(math.exp(self.uniform_nll))} "
                "(the vocabulary size): the policy is uniform")
        return (f"the model died: {seen} on each of the last {self._dead_run} steps (to step {step}), so nothing "
                "more can be learned; usually a learning rate far too high destroyed the weights in the first "
                "steps: lower --lr (and check --optimizer, --warmup-steps), then start again from the model, not "
                "from a checkpoint of this run")

    def _length_drift(self, step: int) -> str | None:
        lengths = self._values("length_mean")
        if self._first_length is None or len(lengths) < self.min_history or self._first_length[1] <= 0:
            return None
        first_step, first = self._first_length
        now = statistics.median(lengths)
        change = (now - first) / first
        if abs(change) <= self.length_drift:
            return ""
        return (f"mean sampled length drifted from {first:.1f} (step {first_step}) to {now:.1f} (median of the last "
                f"{len(lengths)} steps, {change:+.0%}): check for length exploitation (the reward favouring longer "
                "or shorter answers); try a length-normalised reward or penalty, or a larger --kl-coef")
