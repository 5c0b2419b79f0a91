"""`directpo ppo`: PPO on prompts against a reward with a KL penalty (paper §3, eq. 3).

    maximise  E_x E_{y~πθ} [ r(x, y) − β·(log πθ(y|x) − log πref(y|x)) ]

Each step, readable top to bottom:
1. rollouts: `batch_size` prompts, one completion each, sampled from πθ (temperature 1, top-p 1:
   the samples must come from the policy being optimised; `directpo.eval.sampling`);
2. score: r(x, y) from a reward model or a callable (`module:function`, e.g. a ground-truth
   scorer: PPO-GT);
3. per-token rewards (Ziegler et al., 2019): −β·(log πθ(y_t|·) − log πref(y_t|·)) at every response
   token, plus r(x, y) at the last one; log-probs by `directpo.logprobs` (same code as DPO);
4. a value head (one linear map on the policy's last hidden states) gives V(s_t); advantages by
   GAE(γ, λ), whitened; returns = advantages + values;
5. `ppo_epochs` passes of mini-batches over the rollouts: clipped policy loss
   max(−A·ρ, −A·clip(ρ, 1 ± ε)), ρ = πθ/πθ_old per token, plus vf_coef × the clipped value loss;
6. β fixed, or adapted towards `target_kl` (Ziegler et al.'s proportional controller).

Metrics per step (metrics.jsonl): reward (mean r(x, y)), kl (sequence-level, mean over rollouts of
Σ_t log πθ − log πref: the estimator of `directpo eval`), kl_coef, entropy (per token, nats),
clip_frac, value_loss, policy_loss, approx_kl (old → new policy), length_mean, ...
The policy is saved in Hugging Face format (safetensors) with its tokenizer; the value head goes
to value_head.safetensors beside it.

With `--lora-r` the policy trains LoRA adapters and πref is the same network with its adapters
disabled (one copy of the base in memory); the value head, small, is trained whole. Checkpoints
and the saved policy hold the adapters (adapter_model.safetensors) and the value head.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..console import log
from ..data import TokenizedExample
from ..data.collate import collate_padded
from ..data.prompts import encode_prompt, load_prompts
from ..errors import UserValueError
from ..eval.sample import check_context
from ..eval.sampling import decode, generate_completions
from ..eval.scorers import as_scorer, load_reward_fn
from ..logprobs import _backbone_and_head, head_logprobs, token_logps
from ..memory import keep_heap, release_heap
from ..narrow import narrow_last_layer
from ..models import (autocast_ctx, check_vocab, freeze, load_model, load_tokenizer, mask_suppressed_, pick_device,
                      suppress_eos, suppressed_token)
from ..training.loop import batch_order
from ..training.alarms import HealthMonitor
from ..training.lora import adapters_disabled, apply_lora, is_lora, record_base_path
from ..training.optim import build_optimizer, lr_schedule
from ..training.run import Recipe, RunDir, StepDriver, resume, run_steps, setup_torch
from .config import PPOConfig


class KLController:
    """β: fixed, or adaptive: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) (Ziegler et al., 2019)."""

    def __init__(self, value: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = value, adaptive, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.adaptive and math.isfinite(kl):
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n / self.horizon


# ----------------------------------------------------------------------------------------------
# Pure pieces: advantages and losses on (B, L) per-token tensors, `mask` 1 on response tokens.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation per sequence (left-aligned, right-padded): (advantages, returns).

    δ_t = r_t + γ·V_{t+1} − V_t (V = 0 after the last token), A_t = δ_t + γλ·A_{t+1}.
    """
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    L = rewards.shape[1]
    for t in reversed(range(L)):
        next_v = values[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def ppo_losses(logp, old_logp, values, old_values, advantages, returns, mask, cliprange: float,
               cliprange_value: float) -> dict:
    """Clipped surrogate policy loss and clipped value loss (token means), with diagnostics."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return {"policy_loss": masked_mean(pg, mask), "value_loss": masked_mean(vf, mask),
            "clip_frac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask).detach(),
            "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask).detach()}


# ----------------------------------------------------------------------------------------------
# The model side


def policy_forward(policy, value_head: nn.Linear, batch, entropy: bool = False):
    """Per-token log-probs (fp32, `batch.label_pos` order), values V(s_t), and optionally entropies.

    The value of the state before response token t is read from the hidden state that predicts t.
    """
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    parts, banned = _backbone_and_head(policy), suppressed_token(policy)  # (--fixed-length: π' throughout)
    if parts is not None:
        backbone, head = parts
        with narrow_last_layer(backbone, policy, batch.input_ids, batch.label_pos):  # only the rows read below
            hidden = backbone(**kwargs).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.label_pos)
        logp = head_logprobs(head, h, batch.label_ids)
        logits_of = lambda rows: mask_suppressed_(head(rows), banned)  # noqa: E731
    else:  # heads with softcapping / scaling: the model's own logits
        out = policy(**kwargs, output_hidden_states=True)
        logits = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, batch.label_pos).float()
        mask_suppressed_(logits, banned)
        logp = logits.gather(1, batch.label_ids[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
        h = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1]).index_select(0, batch.label_pos)
        logits_of = None
    with torch.autocast(device_type=h.device.type, enabled=False):
        values = value_head(h.float()).squeeze(-1)
    ent = None
    if entropy:
        with torch.no_grad():
            if logits_of is None:
                ent = _entropy(logits)
            else:
                ent = torch.cat([_entropy(logits_of(h[s:s + 1024]).float()) for s in range(0, h.shape[0], 1024)])
    return logp, values, ent


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logz = torch.logsumexp(logits, -1)
    return logz - (torch.softmax(logits, -1) * logits).sum(-1)


def _padded(flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Flat per-token values (sequence-major, as collate_padded emits them) -> (B, max length)."""
    return pad_sequence(list(torch.split(flat, lengths)), batch_first=True)


def save_snapshot(policy, tokenizer, path: Path) -> None:
    """The policy in HF format (with LoRA: its adapters), written to a temporary sibling and
    renamed: whole or absent; its weight files get the usual mode (safetensors writes 0600)."""
    import shutil

    from ..diskio import default_mode

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_lora(policy):  # the adapters, naming their base by its absolute path
        record_base_path(policy)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.glob("*.safetensors"):
        default_mode(f)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


@dataclass
class PPOModels:
    """What a PPO run holds: the policy and its value head, πref, the prompts, the reward."""

    policy: nn.Module
    value_head: nn.Linear
    ref: nn.Module
    tokenizer: object
    items: list  # PromptItem per prompt
    prompt_ids: list[list[int]]
    reward: object  # a checked batch scorer
    device: torch.device


def setup_models(cfg: PPOConfig, reward, device) -> PPOModels:
    if reward is None:
        reward = load_reward_fn(cfg.reward_model, cfg.reward_fn, device=cfg.device, precision=cfg.precision)
    elif cfg.reward_model or cfg.reward_fn:
        raise UserValueError("give the reward either as an argument or in the config, not both")
    items = load_prompts(cfg.prompts, cfg.on_invalid, cfg.data_split)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prompt_ids = [encode_prompt(it.prompt, tokenizer, cfg.max_prompt_length, it.source, it.row) for it in items]
    policy = load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora_r:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
    policy.eval()  # no dropout: the rollout's log-probs are the ratio's denominator
    if cfg.lora_r and (cfg.ref or cfg.model) == cfg.model:  # πref: adapters disabled (`collect_rollouts`)
        ref = policy
    else:
        ref = freeze(load_model(cfg.ref or cfg.model, device, trust_remote_code=cfg.trust_remote_code))
    check_vocab(tokenizer, policy, cfg.model, ref, cfg.ref or cfg.model)
    check_context(policy, items, prompt_ids, 1, cfg.max_new_tokens)  # rollouts past the positions: nonsense
    for m in (policy, ref):  # --fixed-length: rollouts, ratios, KL and entropy all π''s
        suppress_eos(m, tokenizer, cfg.fixed_length)
    head = policy.get_output_embeddings()  # its input width is the width of the last hidden states
    hidden = head.weight.shape[1] if head is not None else policy.config.get_text_config().hidden_size
    value_head = nn.Linear(hidden, 1).to(device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    return PPOModels(policy, value_head, ref, tokenizer, items, prompt_ids, as_scorer(reward), device)


@dataclass
class Rollouts:
    """One PPO step's rollouts: (B, L) per-token tensors, right-padded, `mask` 1 on response tokens."""

    examples: list[TokenizedExample]
    lengths: list[int]
    scores: torch.Tensor
    old_logp: torch.Tensor
    old_values: torch.Tensor
    entropy: torch.Tensor  # flat, per response token
    mask: torch.Tensor
    kl_tok: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def collect_rollouts(m: PPOModels, cfg: PPOConfig, idx: list[int], step: int, kl_coef: float) -> Rollouts:
    """Steps 1-4: sample from πθ, score, per-token rewards with the KL penalty, GAE."""
    p_ids = [m.prompt_ids[i] for i in idx]
    comps = generate_completions(m.policy, m.tokenizer, p_ids, cfg.max_new_tokens, 1.0, 1.0,
                                 seed=cfg.seed * 1_000_003 + 1000 * step,
                                 batch_size=cfg.generation_batch_size or len(p_ids))
    texts = [decode(m.tokenizer, c) for c in comps]
    scores = torch.tensor(m.reward([m.items[i].prompt for i in idx], texts), dtype=torch.float32)
    examples = [TokenizedExample(p, [c]) for p, c in zip(p_ids, comps)]
    lengths = [len(c) for c in comps]
    old_lp, old_v, ent, ref_lp = [], [], [], []
    with torch.no_grad(), autocast_ctx(m.device, cfg.precision):
        for s in range(0, len(examples), cfg.mini_batch_size):
            batch = collate_padded(examples[s:s + cfg.mini_batch_size], m.tokenizer.pad_token_id).to(m.device)
            lp, v, e = policy_forward(m.policy, m.value_head, batch, entropy=True)
            old_lp.append(lp), old_v.append(v), ent.append(e)
            with adapters_disabled(m.ref):  # the LoRA policy itself: its base is πref
                ref_lp.append(token_logps(m.ref, batch))
    old_logp = _padded(torch.cat(old_lp).float().cpu(), lengths)
    old_values = _padded(torch.cat(old_v).float().cpu(), lengths)
    ref_logp = _padded(torch.cat(ref_lp).float().cpu(), lengths)
    mask = _padded(torch.ones(sum(lengths)), lengths)
    kl_tok = (old_logp - ref_logp) * mask
    rewards = -kl_coef * kl_tok
    rewards[torch.arange(len(lengths)), torch.tensor(lengths) - 1] += scores
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    return Rollouts(examples, lengths, scores, old_logp, old_values, torch.cat(ent).float().cpu(), mask, kl_tok,
                    advantages, returns)


def ppo_update(m: PPOModels, cfg: PPOConfig, ro: Rollouts, driver: StepDriver, gen: torch.Generator,
               step: int) -> tuple[dict, list[float]]:
    """Step 5: `ppo_epochs` passes of mini-batches, one optimizer step each. Returns the mean
    losses and the gradient norms."""
    sums, n_mb, grad_norms = {}, 0, []
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(len(ro.examples), generator=gen).tolist()
        for s in range(0, len(perm), cfg.mini_batch_size):
            mb = perm[s:s + cfg.mini_batch_size]
            batch = collate_padded([ro.examples[i] for i in mb], m.tokenizer.pad_token_id).to(m.device)
            L = max(ro.lengths[i] for i in mb)
            with autocast_ctx(m.device, cfg.precision):
                lp, v, _ = policy_forward(m.policy, m.value_head, batch)
            mb_lengths = [ro.lengths[i] for i in mb]
            sel = lambda x: x[mb, :L].to(m.device)  # noqa: E731
            losses = ppo_losses(_padded(lp, mb_lengths), sel(ro.old_logp), _padded(v, mb_lengths),
                                sel(ro.old_values), sel(ro.advantages), sel(ro.returns), sel(ro.mask), cfg.cliprange,
                                cfg.cliprange_value)
            loss = losses["policy_loss"] + cfg.vf_coef * losses["value_loss"]
            loss.backward()
            _, grad_norm, _ = driver.step({"loss": loss.item()}, lambda: f"at PPO step {step}")
            if grad_norm is not None:
                grad_norms.append(grad_norm)
            for k, val in losses.items():
                sums[k] = sums.get(k, 0.0) + val.detach().item()
            n_mb += 1
    return {k: v / n_mb for k, v in sums.items()}, grad_norms


def step_metrics(step: int, ro: Rollouts, losses: dict, grad_norms: list[float], kl_coef: float, lr: float,
                 seconds: float, elapsed: float) -> dict:
    seq_kl = ro.kl_tok.sum(1)
    scores = ro.scores
    return {"step": step, "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0, "kl": seq_kl.mean().item(),
            "kl_coef": kl_coef, "entropy": ro.entropy.mean().item(), **losses,
            "non_score_reward": (-kl_coef * seq_kl).mean().item(), "length_mean": sum(ro.lengths) / len(ro.lengths),
            "value_mean": masked_mean(ro.old_values, ro.mask).item(),
            "return_mean": masked_mean(ro.returns, ro.mask).item(), "lr": lr,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "rollouts_per_s": len(ro.lengths) / seconds, "elapsed_s": elapsed}


def ppo(cfg: PPOConfig, reward=None, callbacks=()) -> dict:
    """Run PPO. `reward`: f(prompt, completion) -> float, or a `batched` scorer (see
    directpo.eval.scorers); default: from cfg.reward_model / cfg.reward_fn."""
    cfg.validate()
    with RunDir(cfg.output_dir) as run:  # claimed (checked, locked) before anything is written
        run.prepare(cfg, "ppo")
        try:
            return _ppo(cfg, reward, run, callbacks)
        finally:
            release_heap()  # (`keep_heap` at setup, on the CPU)


def _ppo(cfg: PPOConfig, reward, run: RunDir, callbacks=()) -> dict:
    setup_torch(cfg.threads, cfg.seed)
    device = pick_device(cfg.device)
    keep_heap(device)  # on the CPU, freed activations stay for the next step (`memory.keep_heap`)
    m = setup_models(cfg, reward, device)
    params = [p for p in m.policy.parameters() if p.requires_grad] + list(m.value_head.parameters())
    optimizer = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    # (the schedule counts optimizer steps: each PPO step takes ppo_epochs × its mini-batches)
    optimizer_steps = cfg.max_steps * cfg.ppo_epochs * math.ceil(cfg.batch_size / cfg.mini_batch_size)
    scheduler = lr_schedule(optimizer, cfg, optimizer_steps)
    kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
    gen = torch.Generator().manual_seed(cfg.seed)  # mini-batch order
    run.record_config("ppo", cfg, reference=cfg.ref or cfg.model, prompts_count=len(m.items))
    log(f"PPO: {cfg.max_steps} steps × {cfg.batch_size} rollouts ({len(m.items)} prompts), {cfg.ppo_epochs} epochs "
        f"of mini-batches of {min(cfg.mini_batch_size, cfg.batch_size)}"
        f"{f' (--mini-batch-size {cfg.mini_batch_size} > --batch-size: the whole batch)' if cfg.mini_batch_size > cfg.batch_size else ''}"
        f", β {cfg.kl_coef}{' (adaptive)' if cfg.adaptive_kl else ''}, "
        f"{cfg.optimizer} lr {cfg.lr}, on {device}")
    # Resume: policy, value head, optimizer, schedule, RNG, β and the mini-batch generator; the
    # prompt order and the sampling seed are functions of the step.
    start_step, state = resume(run, cfg, m.policy, optimizer, scheduler)
    if start_step:
        restore_extra(state["extra"], m.value_head, kl_ctl, gen)
    recipe = PPORecipe(cfg, run, m, params, optimizer, scheduler, kl_ctl, gen, start_step)
    done = run_steps(recipe, start_step, cfg.max_steps, callbacks)
    recipe.driver.check_weights("the final policy")
    return save_ppo(m, run, {"output_dir": str(run.path), "train": done["train"], "final_kl_coef": kl_ctl.value,
                             "stopped_at": done["stopped_at"]})


class PPORecipe(Recipe):
    """PPO's hooks of the step loop (`training.run.run_steps`): rollouts, scores, the clipped update."""

    name = "ppo"

    def __init__(self, cfg: PPOConfig, run: RunDir, m: PPOModels, params, optimizer, scheduler,
                 kl_ctl: KLController, gen: torch.Generator, start_step: int):
        self.cfg, self.run, self.m, self.optimizer, self.scheduler = cfg, run, m, optimizer, scheduler
        self.kl_ctl, self.gen = kl_ctl, gen
        self.order = batch_order(len(m.items), cfg.batch_size, cfg.seed)
        for _ in range(start_step):
            next(self.order)
        self.driver = StepDriver(params, optimizer, scheduler, cfg.max_grad_norm, skip_nonfinite=cfg.skip_nonfinite,
                                 divergence_factor=cfg.divergence_factor, hint=f"Lower --lr (now {cfg.lr:g})")
        self.alarms = HealthMonitor("ppo")

    def train_step(self, step: int) -> dict:
        cfg, m, t0 = self.cfg, self.m, time.perf_counter()
        self.epoch, idx = next(self.order)
        ro = collect_rollouts(m, cfg, idx, step, self.kl_ctl.value)
        losses, grad_norms = ppo_update(m, cfg, ro, self.driver, self.gen, step)
        beta = self.kl_ctl.value
        self.kl_ctl.update(ro.kl_tok.sum(1).mean().item(), len(idx))  # 6. the KL coefficient
        line = step_metrics(step, ro, losses, grad_norms, beta, self.scheduler.get_last_lr()[0],
                            time.perf_counter() - t0, time.perf_counter() - self.t_start)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.max_steps:
            save_snapshot(m.policy, m.tokenizer, self.run.path / "snapshots" / f"step-{step}")
        return line

    def progress_text(self, m: dict) -> tuple[str, str]:
        short = f"reward {m['reward']:.3f} kl {m['kl']:.3f} β {m['kl_coef']:.3g} clip {m['clip_frac']:.2f}"
        return short, f"{short} vloss {m['value_loss']:.4f} ent {m['entropy']:.3f}"

    def save_checkpoint(self, step: int):
        return self.run.save_checkpoint(step, self.epoch, self.m.policy, self.optimizer, self.scheduler, self.cfg,
                                        extra=extra_state(self.m.value_head, self.kl_ctl, self.gen))


def extra_state(value_head: nn.Linear, kl_ctl: KLController, gen: torch.Generator) -> dict:
    """What a PPO checkpoint holds beyond the policy, optimizer and schedule."""
    return {"value_head": {k: v.detach().cpu().clone() for k, v in value_head.state_dict().items()},
            "kl_coef": kl_ctl.value, "generator": gen.get_state()}


def restore_extra(extra: dict, value_head: nn.Linear, kl_ctl: KLController, gen: torch.Generator) -> None:
    value_head.load_state_dict(extra["value_head"])
    kl_ctl.value = float(extra["kl_coef"])
    gen.set_state(extra["generator"])


def save_ppo(m: PPOModels, run: RunDir, result: dict) -> dict:
    """The policy in Hugging Face format with its tokenizer, the value head beside it; run complete."""
    from safetensors.torch import save_file

    from ..diskio import staging_dir, tensor_bytes, warn_if_short

    if is_lora(m.policy):  # the adapters alone, naming their base (adapter_config.json)
        record_base_path(m.policy)
    needed = tensor_bytes([p for p in m.policy.parameters() if p.requires_grad] if is_lora(m.policy) else
                          m.policy.state_dict())
    warn_if_short(run.path, needed, f"the final policy ({run.path})")
    with staging_dir(run.path, needed, f"; the policy was not written (the files in {run.path} are as they "
                                       "were)") as tmp:  # written whole, or not at all
        m.policy.save_pretrained(tmp)
        m.tokenizer.save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in m.value_head.state_dict().items()},
                  str(tmp / "value_head.safetensors"))
    run.complete(result)
    log(f"saved policy, tokenizer and value head to {run.path}")
    return result
