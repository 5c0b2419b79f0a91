"""Online (iterative) DPO: sample from the policy, score, pair, train, repeat (`directpo online`).

Round r = 1..R starts from the policy of round r − 1 (round 1: the SFT model) and

1. samples K completions per prompt from it (`directpo.eval.sample.draw_samples`),
2. scores them with the reward (a `module:function` callable or a reward model),
3. pairs them per prompt, best vs worst or every pair whose rewards differ by more than the margin
   (a prompt whose samples all tie gives none): `O/round-r/pairs.jsonl` (prompt/chosen/rejected),
4. trains DPO on the pairs from that policy into `O/round-r/policy`, against πref = the round's
   starting policy (`ref="round"`) or the SFT model (`ref="initial"`),
5. evaluates the new policy on the eval prompts against πSFT: mean reward, KL(π‖πSFT), length.

With `lora_r`, each round's DPO trains LoRA adapters on its starting policy and saves that policy
merged with them (`O/round-r/policy`, a whole model): the next round samples from it, and the
round's πref is unchanged: with `ref="round"` the round's starting policy is its LoRA network with
the adapters disabled (one copy of the weights in memory), with `ref="initial"` the SFT model (in
round 1 the same, adapters disabled; later rounds load it beside the policy to precompute its
log-probs, then free it). So round r's policy is πSFT plus r low-rank updates, one per round.

`O/rounds.jsonl` holds one line per round (round 0: the SFT model itself), `O/online.png` the
reward–KL path. Every stage is resumable: sampling+pairing and evaluation record their result last
(`training.stages.resumable`), the trainer keeps its checkpoints and completion marker, so a killed run
continues where it stopped and a finished one redoes nothing. The settings are recorded in
`O/online_config.json`; a rerun into the same directory with other settings is refused (unless
`overwrite`), except for the number of rounds (more rounds continue the run) and settings that do
not change the result.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import outputs
from ..config import (ConfigError, FixedLengthSettings, changed_settings, check_micro_batch, check_ranges, check_required,
                      input_paths, setting)
from ..console import log as console_log
from ..diskio import write_text
from ..errors import UserValueError
from ..training.config import LoraSettings
from ..training.optim import OPTIMIZERS
from ..training.stages import resumable

CONFIG_FILE = "online_config.json"
ROUNDS_FILE = "rounds.jsonl"
PLOT_FILE = "online.png"
NO_LOG_LINES = 10 ** 9  # the rounds log their own progress; the trainer's per-step lines are off
ROUND_FIELDS = ("round", "reward", "reward_se", "kl", "kl_se", "length", "pairs", "seconds")
# Settings that may differ between a run and its continuation: they do not change any round's result.
FREE_SETTINGS = frozenset({"rounds", "overwrite", "progress", "device", "threads", "output_dir"})


@dataclass
class OnlineConfig(LoraSettings, FixedLengthSettings):
    """Online (iterative) DPO: sample from the policy, score, pair, train, repeat"""

    model: str = setting(None, "the SFT model to start from (round 0, and πref with --ref initial): hub id or "
                               "local directory", required=True, input=True)
    prompts: str = setting(None, "training prompts: JSONL with a 'prompt' field, or any preference file directpo "
                                 "reads", required=True, input=True)
    output_dir: str = setting(None, "where the rounds (round-R/pairs.jsonl, round-R/policy), rounds.jsonl and "
                                    "online.png go", required=True)
    reward_fn: str | None = setting(None, "reward callable 'module:function' (f(prompt, completion) -> float)")
    reward_model: str | None = setting(None, "reward model directory (`directpo rm` output)", input=True)
    rounds: int = setting(3, "rounds of sample → score → pair → train → evaluate (raise it to continue a run)",
                          ge=1)
    samples_per_prompt: int = setting(4, "completions sampled per prompt and round (K)", ge=2)
    pairs: str = setting("best_worst", "pairs per prompt: best vs worst sample, or every pair of samples whose "
                                       "rewards differ by more than --pair-margin", choices=["best_worst", "all"])
    pair_margin: float = setting(0.0, "a pair needs reward(chosen) − reward(rejected) > this", ge=0)
    ref: str = setting("round", "πref of each round's DPO: the round's starting policy, or the SFT model",
                       choices=["round", "initial"])
    beta: float = setting(0.1, "β of DPO", gt=0)
    lr: float = setting(1e-6, "peak learning rate of each round's DPO", gt=0)
    optimizer: str = setting("rmsprop", "optimizer", choices=list(OPTIMIZERS))
    batch_size: int = setting(64, "pairs per optimizer step (all the pairs when fewer)", ge=1)
    micro_batch_size: int = setting(8, "pairs per forward/backward", ge=1)
    epochs_per_round: float = setting(1.0, "passes over each round's pairs", gt=0)
    warmup_steps: int = setting(0, "linear learning-rate warm-up of each round's DPO, optimizer steps", ge=0)
    max_new_tokens: int = setting(32, "max tokens per sampled completion", ge=1)
    temperature: float = setting(1.0, "sampling temperature of the training samples (evaluation samples at 1: "
                                      "the KL estimate needs π's own samples)", gt=0)
    sample_batch_size: int = setting(32, "completions generated at once", ge=1)
    eval_prompts: str | None = setting(None, "prompts to evaluate each round on (default: the training prompts)",
                                         input=True)
    eval_samples: int = setting(2, "completions per eval prompt", ge=1)
    max_length: int | None = setting(512, "max tokens of prompt + completion in training", ge=2)
    seed: int = setting(0, "seed of sampling, evaluation and data order")
    device: str | None = setting(None, "cpu or cuda (default: cuda when available)")
    threads: int = setting(0, "CPU threads for torch (0: torch's default)", ge=0)
    overwrite: bool = setting(False, "start over in an output directory that holds another online run")
    progress: bool = setting(True, "show progress bars")

    def validate(self, need_reward: bool = True) -> "OnlineConfig":
        check_required(self)
        if need_reward and (self.reward_fn is None) == (self.reward_model is None):
            raise ConfigError("give exactly one of --reward-fn module:function and --reward-model DIR")
        check_ranges(self)
        check_micro_batch(self.batch_size, self.micro_batch_size)
        self.check_lora_settings()
        return self


def log(msg: str) -> None:
    console_log(msg, prefix="directpo online")


# ----------------------------------------------------------------------------------------------
# Pairs


def build_pairs(prompts: list, texts: list[str], rewards: list[float], k: int, mode: str = "best_worst",
                margin: float = 0.0) -> tuple[list[dict], int]:
    """Preference rows from k samples per prompt (prompt-major, sample j of prompt i at i·k + j), and
    the number of prompts that gave none (their samples tie within the margin). A pair's chosen
    sample has the higher reward, by more than `margin`; identical texts never pair."""
    rows, empty = [], 0
    for i, prompt in enumerate(prompts):
        group = [(rewards[i * k + j], texts[i * k + j]) for j in range(k)]
        if mode == "best_worst":
            best = max(range(k), key=lambda j: group[j][0])
            worst = min(range(k), key=lambda j: group[j][0])
            candidates = [(best, worst)]
        else:
            candidates = [(a, b) if group[a][0] >= group[b][0] else (b, a) for a in range(k) for b in range(a + 1, k)]
        found = [{"prompt": prompt, "chosen": group[c][1], "rejected": group[r][1], "chosen_reward": group[c][0],
                  "rejected_reward": group[r][0]}
                 for c, r in candidates if group[c][0] - group[r][0] > margin and group[c][1] != group[r][1]]
        empty += not found
        rows += found
    return rows, empty


def sample_and_pair(cfg: OnlineConfig, policy: str, scorer, r: int, round_dir: Path) -> dict:
    """Stages 1–3 of round r: K samples per prompt from `policy`, their rewards, the pairs
    (round_dir/pairs.jsonl; every sample with its reward in round_dir/samples.jsonl)."""
    from ..data.prompts import load_prompts
    from ..data.readers import write_jsonl
    from ..eval.evaluate import mean_se
    from ..eval.sample import draw_samples
    from ..models import load_model, load_tokenizer, pick_device, suppress_eos

    t0 = time.perf_counter()
    items = load_prompts(cfg.prompts)
    tokenizer = load_tokenizer(policy)
    model = load_model(policy, pick_device(cfg.device))
    suppress_eos(model, tokenizer, cfg.fixed_length)  # --fixed-length: samples of π', trained on as π''s
    k = cfg.samples_per_prompt
    s = draw_samples(model, tokenizer, items, k, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed + 1009 * r,
                     batch_size=cfg.sample_batch_size, progress=f"round {r}: sampling" if cfg.progress else None)
    del model
    rewards = scorer(s.prompts, s.texts)
    write_jsonl(({"prompt_index": i // k, "index": i % k, "prompt": s.prompts[i], "completion": s.texts[i],
                  "reward": rewards[i]} for i in range(len(s.texts))), round_dir / "samples.jsonl")
    rows, empty = build_pairs([it.prompt for it in items], s.texts, rewards, k, cfg.pairs, cfg.pair_margin)
    write_jsonl(rows, round_dir / "pairs.jsonl")
    sample_reward, _ = mean_se(rewards)
    margin = sum(p["chosen_reward"] - p["rejected_reward"] for p in rows) / len(rows) if rows else 0.0
    return {"pairs": len(rows), "prompts": len(items), "tied_prompts": empty, "sample_reward": sample_reward,
            "pair_reward_margin": margin, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def train_round(cfg: OnlineConfig, start: str, r: int, round_dir: Path) -> dict:
    """Stage 4 of round r: DPO on round_dir/pairs.jsonl from `start` into round_dir/policy. A
    killed run continues from its last checkpoint, or trains the round again when it had none (the
    same seed: the same policy); a finished one is not redone."""
    from ..training.checkpoint import list_checkpoints
    from ..training.config import TrainConfig
    from ..training.loop import train
    from ..training.run import COMPLETE_MARKER, is_complete

    out = round_dir / "policy"
    t0 = time.perf_counter()
    if not is_complete(out):
        # a round killed before its first checkpoint (or one without any) trains again from its start
        again = not list_checkpoints(out)
        train(TrainConfig(model=start, data=str(round_dir / "pairs.jsonl"), output_dir=str(out),
                          ref=cfg.model if cfg.ref == "initial" else None, beta=cfg.beta, lr=cfg.lr,
                          optimizer=cfg.optimizer, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                          epochs=cfg.epochs_per_round, warmup_steps=cfg.warmup_steps, max_length=cfg.max_length,
                          seed=cfg.seed + r, device=cfg.device, threads=cfg.threads, progress=cfg.progress,
                          log_every=NO_LOG_LINES, resume=None if again else "latest", overwrite=again,
                          lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          lora_target_modules=cfg.lora_target_modules, fixed_length=cfg.fixed_length,
                          merge=bool(cfg.lora_r)))  # merged: the next round and the evaluation load it whole
    train_metrics = json.loads((out / COMPLETE_MARKER).read_text()).get("train") or {}
    return {"seconds": time.perf_counter() - t0,
            "train": {k: v for k, v in train_metrics.items() if isinstance(v, (int, float))}}


def evaluate_round(cfg: OnlineConfig, policy: str, scorer, round_dir: Path) -> dict:
    """Stage 5: reward, KL(π‖πSFT) and length of `policy` on the eval prompts (round_dir/eval.json).
    Every round is evaluated on the same seed: differences between rounds are the policy's."""
    from ..eval.evaluate import evaluate_policy

    t0 = time.perf_counter()
    res = evaluate_policy(policy, cfg.eval_prompts or cfg.prompts, str(round_dir / "eval.json"), ref=cfg.model,
                          reward=scorer, n=cfg.eval_samples, temperatures=(1.0,), max_new_tokens=cfg.max_new_tokens,
                          seed=cfg.seed + 999_983, batch_size=cfg.sample_batch_size, device=cfg.device,
                          samples_out=str(round_dir / "eval_samples.jsonl"), progress=cfg.progress,
                          fixed_length=cfg.fixed_length)
    return {"reward": res.get("reward_mean"), "reward_se": res.get("reward_se"), "kl": res.get("kl_mean"),
            "kl_se": res.get("kl_se"), "length": res.get("length_mean"), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# The run


def check_output_dir(cfg: OnlineConfig, out: Path) -> None:
    """Refuse a directory holding another online run (other settings) unless `overwrite`, which
    removes that run's files; record the settings. (What no command may write into, a folder of
    someone else's files among them: `outputs.check_output_dir`, checked before.)"""
    recorded_path = out / CONFIG_FILE
    if recorded_path.exists():
        differ = changed_settings(json.loads(recorded_path.read_text()), cfg, FREE_SETTINGS, flags=True)
        if differ and not cfg.overwrite:
            shown = ", ".join(differ)
            raise FileExistsError(f"{out} holds an online run with other settings ({shown}); use another "
                                  f"--output-dir, or --overwrite to start over")
        if differ:
            log(f"--overwrite: removing the previous run in {out}")
            for p in list(out.glob("round-*")):
                shutil.rmtree(p)
            for name in (ROUNDS_FILE, PLOT_FILE, CONFIG_FILE):
                (out / name).unlink(missing_ok=True)
    write_text(recorded_path, json.dumps(asdict(cfg), indent=2))


def run_round(cfg: OnlineConfig, scorer, r: int, out: Path) -> dict:
    """Round r (resumable stage by stage); its line of rounds.jsonl."""
    round_dir = out / f"round-{r}"
    start = cfg.model if r == 1 else str(out / f"round-{r - 1}" / "policy")
    pairs = resumable(round_dir / "pairs.done.json", lambda: sample_and_pair(cfg, start, scorer, r, round_dir))
    if not pairs["pairs"]:
        raise UserValueError(f"round {r}: no pairs, every prompt's {cfg.samples_per_prompt} samples tie (within "
                             f"--pair-margin {cfg.pair_margin:g}); raise --samples-per-prompt or --temperature")
    log(f"round {r}: {pairs['pairs']} pairs from {pairs['prompts']} prompts ({pairs['tied_prompts']} tied), sample "
        f"reward {pairs['sample_reward']:.4g}, mean pair margin {pairs['pair_reward_margin']:.4g}")
    trained = resumable(round_dir / "train.done.json", lambda: train_round(cfg, start, r, round_dir))
    ev = resumable(round_dir / "eval.done.json",
                   lambda: evaluate_round(cfg, str(round_dir / "policy"), scorer, round_dir))
    seconds = pairs["seconds"] + trained["seconds"] + ev["seconds"]
    return {"round": r, **{k: ev[k] for k in ("reward", "reward_se", "kl", "kl_se", "length")},
            "pairs": pairs["pairs"], "seconds": seconds}


def run_online(cfg: OnlineConfig, scorer=None) -> dict:
    """The rounds; `scorer` (a batch scorer, e.g. a study's ground truth) replaces --reward-fn/--reward-model."""
    cfg.validate(need_reward=scorer is None)
    out = Path(cfg.output_dir)
    outputs.check_output_dir(out, input_paths(cfg), cfg.overwrite, markers=(CONFIG_FILE, outputs.LOCK_FILE),
                             what="online run")
    with outputs.RunLock(out, "online"):  # one run per folder (each round's training locks its own too)
        check_output_dir(cfg, out)
        return _run_online(cfg, scorer, out)


def _run_online(cfg: OnlineConfig, scorer, out: Path) -> dict:
    from ..data.readers import write_jsonl
    from ..eval.scorers import load_reward_fn

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if scorer is None:
        scorer = load_reward_fn(cfg.reward_model, cfg.reward_fn, device=cfg.device)
    t0 = time.perf_counter()
    ev0 = resumable(out / "round-0" / "eval.done.json", lambda: evaluate_round(cfg, cfg.model, scorer, out / "round-0"))
    lines = [{"round": 0, **{k: ev0[k] for k in ("reward", "reward_se", "kl", "kl_se", "length")}, "pairs": 0,
              "seconds": ev0["seconds"]}]
    log(f"round 0 (SFT): reward {ev0['reward']:.4g}, KL {ev0['kl']:.3g}")
    for r in range(1, cfg.rounds + 1):
        lines.append(run_round(cfg, scorer, r, out))
        write_jsonl(lines, out / ROUNDS_FILE)
        log(f"round {r}: reward {lines[-1]['reward']:.4g} ± {lines[-1]['reward_se']:.2g}, KL(π‖πSFT) "
            f"{lines[-1]['kl']:.3g}, length {lines[-1]['length']:.3g}")
    plot_rounds(lines, out / PLOT_FILE)
    return {"output_dir": str(out), "rounds": lines, "final_policy": str(out / f"round-{cfg.rounds}" / "policy"),
            "plot": str(out / PLOT_FILE), "seconds": time.perf_counter() - t0}


def plot_rounds(lines: list[dict], path: Path) -> None:
    """Mean reward against KL(π‖πSFT), one point per round (error bars: standard errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    kl = [max(line["kl"] or 0.0, 0.0) for line in lines]
    reward = [line["reward"] or 0.0 for line in lines]
    ax.errorbar(kl, reward, xerr=[line["kl_se"] or 0.0 for line in lines],
                yerr=[line["reward_se"] or 0.0 for line in lines], marker="o", color="tab:red", capsize=3)
    for x, y, line in zip(kl, reward, lines):
        ax.annotate(str(line["round"]), (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("KL(π‖πSFT) (nats)")
    ax.set_ylabel("mean reward")
    ax.set_title("online DPO: one point per round (0: πSFT)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
