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
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .. import __version__
from ..data import TokenizedExample
from ..data.collate import collate_padded
from ..eval.sampling import decode, encode_prompt, generate_completions, load_prompts
from ..logprobs import _backbone_and_head, label_logprobs, token_logps
from ..models import freeze, load_model, load_tokenizer, pick_device
from ..train.loop import COMPLETE_MARKER, autocast_ctx, batch_order, log
from ..train.optim import build_optimizer, warmup_schedule
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
    parts = _backbone_and_head(policy)
    if parts is not None:
        backbone, head = parts
        hidden = backbone(**kwargs).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.label_pos)
        logp = label_logprobs(h, head, batch.label_ids)
        logits_of = lambda rows: head(rows)  # noqa: E731
    else:  # heads with softcapping / scaling: the model's own logits
        out = policy(**kwargs, output_hidden_states=True)
        logits = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, batch.label_pos).float()
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
    """The policy in HF format, written to a temporary sibling and renamed: whole or absent."""
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def ppo(cfg: PPOConfig, reward=None) -> dict:
    """Run PPO. `reward`: f(prompt, completion) -> float, or a `batched` scorer (see
    directpo.rlhf.rewards); default: from cfg.reward_model / cfg.reward_fn."""
    from .rewards import as_scorer, load_reward_fn

    cfg.validate()
    out = Path(cfg.output_dir)
    if (out / "metrics.jsonl").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a run (metrics.jsonl); pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if reward is None:
        reward = load_reward_fn(cfg.reward_model, cfg.reward_fn, device=cfg.device, precision=cfg.precision)
    elif cfg.reward_model or cfg.reward_fn:
        raise ValueError("give the reward either as an argument or in the config, not both")
    reward = as_scorer(reward)

    items = load_prompts(cfg.prompts, cfg.on_invalid, cfg.data_split)
    tokenizer = load_tokenizer(cfg.model)
    prompt_ids = [encode_prompt(it.prompt, tokenizer, cfg.max_prompt_length) for it in items]
    policy = load_model(cfg.model, device)
    policy.eval()  # no dropout: the rollout's log-probs are the ratio's denominator
    ref = freeze(load_model(cfg.ref or cfg.model, device))
    head = policy.get_output_embeddings()  # its input width is the width of the last hidden states
    hidden = head.weight.shape[1] if head is not None else policy.config.get_text_config().hidden_size
    value_head = nn.Linear(hidden, 1).to(device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
    pad = tokenizer.pad_token_id
    (out / "directpo_config.json").write_text(json.dumps(
        {"directpo_version": __version__, "command": "ppo", **asdict(cfg), "reference": cfg.ref or cfg.model,
         "prompts_count": len(items)}, indent=2))
    log(f"PPO: {cfg.max_steps} steps × {cfg.batch_size} rollouts ({len(items)} prompts), {cfg.ppo_epochs} epochs of "
        f"mini-batches of {cfg.mini_batch_size}, β {cfg.kl_coef}{' (adaptive)' if cfg.adaptive_kl else ''}, "
        f"{cfg.optimizer} lr {cfg.lr}, on {device}")

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, desc="ppo", unit="step", mininterval=1.0, dynamic_ncols=True)
    metrics = open(out / "metrics.jsonl", "w")
    order = batch_order(len(items), cfg.batch_size, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_start, last = time.perf_counter(), {}
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        _, idx = next(order)
        # 1-2. rollouts from πθ, scored
        p_ids = [prompt_ids[i] for i in idx]
        comps = generate_completions(policy, tokenizer, p_ids, cfg.max_new_tokens, 1.0, 1.0,
                                     seed=cfg.seed * 1_000_003 + 1000 * step,
                                     batch_size=cfg.generation_batch_size or len(p_ids))
        texts = [decode(tokenizer, c) for c in comps]
        scores = torch.tensor(reward([items[i].prompt for i in idx], texts), dtype=torch.float32)
        examples = [TokenizedExample(p, [c]) for p, c in zip(p_ids, comps)]
        lengths = [len(c) for c in comps]
        # 3-4. old log-probs, reference log-probs, values; per-token rewards; GAE
        with torch.no_grad(), autocast_ctx(device, cfg.precision):
            old_lp, old_v, ent = [], [], []
            ref_lp = []
            for s in range(0, len(examples), cfg.mini_batch_size):
                batch = collate_padded(examples[s:s + cfg.mini_batch_size], pad).to(device)
                lp, v, e = policy_forward(policy, value_head, batch, entropy=True)
                old_lp.append(lp), old_v.append(v), ent.append(e)
                ref_lp.append(token_logps(ref, batch))
        old_logp = _padded(torch.cat(old_lp).float().cpu(), lengths)
        old_values = _padded(torch.cat(old_v).float().cpu(), lengths)
        ref_logp = _padded(torch.cat(ref_lp).float().cpu(), lengths)
        entropy = torch.cat(ent).float().cpu()
        mask = _padded(torch.ones(sum(lengths)), lengths)
        kl_tok = (old_logp - ref_logp) * mask
        rewards = -kl_ctl.value * kl_tok
        rewards[torch.arange(len(lengths)), torch.tensor(lengths) - 1] += scores
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        # 5. PPO epochs over mini-batches
        sums, n_mb, grad_norms = {}, 0, []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(examples), generator=gen).tolist()
            for s in range(0, len(perm), cfg.mini_batch_size):
                mb = perm[s:s + cfg.mini_batch_size]
                batch = collate_padded([examples[i] for i in mb], pad).to(device)
                L = max(lengths[i] for i in mb)
                with autocast_ctx(device, cfg.precision):
                    lp, v, _ = policy_forward(policy, value_head, batch)
                mb_lengths = [lengths[i] for i in mb]
                sel = lambda x: x[mb, :L].to(device)  # noqa: E731
                losses = ppo_losses(_padded(lp, mb_lengths), sel(old_logp), _padded(v, mb_lengths), sel(old_values),
                                    sel(advantages), sel(returns), sel(mask), cfg.cliprange, cfg.cliprange_value)
                loss = losses["policy_loss"] + cfg.vf_coef * losses["value_loss"]
                loss.backward()
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for k, val in losses.items():
                    sums[k] = sums.get(k, 0.0) + val.detach().item()
                n_mb += 1
        # 6. KL coefficient, metrics
        seq_kl = kl_tok.sum(1)
        beta = kl_ctl.value
        kl_ctl.update(seq_kl.mean().item(), len(idx))
        dt = time.perf_counter() - t0
        last = {"step": step, "reward": scores.mean().item(),
                "reward_std": scores.std().item() if len(scores) > 1 else 0.0, "kl": seq_kl.mean().item(),
                "kl_coef": beta, "entropy": entropy.mean().item(), **{k: v / n_mb for k, v in sums.items()},
                "non_score_reward": (-beta * seq_kl).mean().item(), "length_mean": sum(lengths) / len(lengths),
                "value_mean": masked_mean(old_values, mask).item(), "return_mean": masked_mean(returns, mask).item(),
                "lr": scheduler.get_last_lr()[0], "grad_norm": sum(grad_norms) / len(grad_norms),
                "rollouts_per_s": len(idx) / dt, "elapsed_s": time.perf_counter() - t_start}
        metrics.write(json.dumps(last) + "\n")
        metrics.flush()
        summary = f"reward {last['reward']:.3f} kl {last['kl']:.3f} β {beta:.3g} clip {last['clip_frac']:.2f}"
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(summary)
        elif step % cfg.log_every == 0 or step == cfg.max_steps:
            log(f"step {step}/{cfg.max_steps} {summary} vloss {last['value_loss']:.4f} ent {last['entropy']:.3f}")
        if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.max_steps:
            save_snapshot(policy, tokenizer, out / "snapshots" / f"step-{step}")
    if bar is not None:
        bar.close()
    metrics.close()

    from safetensors.torch import save_file

    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
              str(out / "value_head.safetensors"))
    result = {"output_dir": str(out), "train": last, "final_kl_coef": kl_ctl.value}
    (out / COMPLETE_MARKER).write_text(json.dumps(result))
    log(f"saved policy, tokenizer and value head to {out}")
    return result
