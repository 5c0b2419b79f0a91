"""Trainer settings: dataclasses whose fields are the commands' flags (see `directpo.config`).

    RunConfig              what every trainer takes: the run directory, optimisation, checkpoints,
    │                      the machine (DPO/SFT, the reward model and PPO alike)
    ├── PreferenceRunConfig  + a preference data set: model, data, lengths, evaluation, micro-batches
    │   ├── TrainConfig      + the loss, β, the reference, layouts, LoRA, several processes or nodes (`train`, `sft`)
    │   └── (rlhf) RewardModelConfig
    └── (rlhf) PPOConfig
    LoraSettings           the LoRA flags, one definition mixed into TrainConfig, PPOConfig, (rlhf) OnlineConfig

Defaults are the paper's (appendix B): β = 0.1, batch 64, RMSprop at lr 1e-6, 150 warm-up steps.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import (ConfigError, FixedLengthSettings, ResumableSettings, check_micro_batch, check_ranges,
                      check_required, flag_name, setting)
from .lora import QUANTIZE, check_quantize
from .optim import OPTIMIZERS, SCHEDULERS, check_optimizer


@dataclass
class RunConfig:
    """Run directory, optimisation, checkpoints, machine"""

    output_dir: str = setting(None, "where the final model, tokenizer and metrics.jsonl go", required=True, resumable=True)
    lr: float = setting(1e-6, "peak learning rate (paper: 1e-6)", gt=0)
    optimizer: str = setting("rmsprop", "optimizer (paper: rmsprop)", choices=list(OPTIMIZERS))
    weight_decay: float = setting(0.0, "weight decay (adamw)", ge=0)
    batch_size: int = setting(64, "examples per optimizer step (paper: 64 preference pairs)", ge=1)
    max_steps: int | None = setting(None, "optimizer steps to run (overrides epochs)", ge=1, resumable=True)
    warmup_steps: int = setting(150, "linear learning-rate warm-up from 0 (paper: 150)", ge=0)
    warmup_ratio: float = setting(0.0, "instead: warm up over this fraction of the run's optimizer steps (0: use "
                                       "warmup_steps)", ge=0, lt=1)
    lr_scheduler: str = setting("constant", "the learning rate after warm-up: constant (the paper's), linear or "
                                            "cosine decay to 0, or cosine_with_min_lr (to min_lr_ratio × lr)",
                                choices=list(SCHEDULERS))
    min_lr_ratio: float = setting(0.0, "with --lr-scheduler cosine_with_min_lr: the final learning rate as a "
                                       "fraction of --lr", ge=0, le=1)
    max_grad_norm: float = setting(10.0, "clip the gradient norm to this (0: no clipping)", ge=0)
    seed: int = setting(0, "seed for initialisation-independent randomness: data order")
    precision: str = setting("auto", "bf16: autocast matmuls to bfloat16 (fp32 master weights and loss); auto: bf16 "
                                     "where the device runs it fast (a GPU with native bf16, a CPU whose measured "
                                     "bf16 matmul beats fp32), fp32 elsewhere; DIRECTPO_AUTO_PRECISION=fp32|bf16 "
                                     "pins what auto picks", choices=["auto", "fp32", "bf16"])
    device: str | None = setting(None, "cpu or cuda (default: cuda when available)", resumable=True)
    threads: int = setting(0, "CPU threads for torch (0: torch's default)", ge=0, resumable=True)
    log_every: int = setting(1, "print a metrics line every N steps (metrics.jsonl always gets every step)", ge=1, resumable=True)
    overwrite: bool = setting(False, "allow writing into an output directory that already holds a run", resumable=True)
    save_every: int = setting(0, "write a checkpoint (weights, optimizer, scheduler, RNG) every N steps (0: never)", ge=0, resumable=True)
    keep_last: int = setting(0, "keep only the newest K checkpoints (0: keep all)", ge=0, resumable=True)
    resume: str | None = setting(None, "continue from the latest checkpoint in output_dir (--resume), or from PATH",
                                 nargs="?", const="latest", resumable=True)
    resume_from_last_good: bool = setting(False, "with --resume: if the latest checkpoint is damaged (a file "
                                                 "truncated or changed since it was written), resume from the "
                                                 "newest intact one instead of stopping", resumable=True)
    skip_nonfinite: bool = setting(False, "skip (and count) steps whose loss or gradient is NaN/inf instead of "
                                          "stopping", resumable=True)
    divergence_factor: float = setting(1000.0, "stop (without applying the update) when the loss or the gradient "
                                               "norm exceeds this many times its first step's value, each floored "
                                               "at 1: the run diverged (0: never)", ge=0, resumable=True)
    stop_on_alarm: bool = setting(True, "stop the run when a health alarm says the model cannot recover "
                                        "(dead_gradients: it died); --no-stop-on-alarm logs it and trains on", resumable=True)
    trust_remote_code: bool = setting(False, "allow model/tokenizer repos to run their own Python code (off: safer)")
    progress: bool = setting(True, "show a progress bar with ETA", resumable=True)
    report_to: str = setting("none", "also send the metrics to TensorBoard (OUTPUT/tensorboard/) or Weights & Biases "
                                     "(OUTPUT/wandb/, offline unless WANDB_MODE says otherwise); needs "
                                     "`pip install 'directpo[report]'`", choices=["none", "tensorboard", "wandb"], resumable=True)
    push_to_hub: str | None = setting(None, "when the run is done, upload OUTPUT (weights, tokenizer, model card, "
                                            "settings, metrics; never checkpoints/) to this Hugging Face model repo, "
                                            "owner/name (token: HF_TOKEN or `hf auth login`)", resumable=True)
    hub_private: bool = setting(False, "with --push-to-hub: create the repo private", resumable=True)

    # Settings that may change between a run and its resumption (they do not change the
    # trajectory): each is declared `resumable=True` on its field.
    RESUMABLE_CHANGES = ResumableSettings()

    def validate(self):
        check_required(self)
        check_ranges(self)
        if self.min_lr_ratio and self.lr_scheduler != "cosine_with_min_lr":
            raise ConfigError(f"--min-lr-ratio: the '{self.lr_scheduler}' schedule does not read it (only "
                              "--lr-scheduler cosine_with_min_lr does)")
        from .hub import check_repo_id
        from .loggers import check_report_to

        check_report_to(self.report_to)  # a missing package, said before anything loads
        check_optimizer(self)
        if self.push_to_hub:
            check_repo_id(self.push_to_hub)
        return self


@dataclass
class PreferenceRunConfig(RunConfig):
    """Model and preference data"""

    model: str = setting(None, "model to train: a Hugging Face model id or local directory", required=True,
                         input=True)
    data: str = setting(None, "preference data: .jsonl/.json/.parquet file, or a `datasets` name/dir", required=True,
                        input=True)
    micro_batch_size: int = setting(8, "examples per forward/backward; batch_size/micro_batch_size are accumulated", ge=1)
    epochs: float = setting(1.0, "passes over the training data, when max_steps is not set", gt=0, resumable=True)
    max_length: int | None = setting(512, "max tokens of prompt + response; a pair that does not fit has its prompt "
                                          "cut from the left (see max_prompt_length), then its responses from the "
                                          "right", ge=2)
    max_prompt_length: int | None = setting(None, "max prompt tokens, longer prompts always cut from the left "
                                                  "(default: only the prompts of pairs that do not fit, to half of "
                                                  "max_length)", ge=1)
    eval_data: str | None = setting(None, "held-out preference data for periodic evaluation",
                                        input=True, resumable=True)
    eval_every: int = setting(0, "evaluate every N optimizer steps (0: only at the end, when eval_data is set)", ge=0, resumable=True)
    ranking_pairs: str = setting("all", "ranked rows as pairs: every (better, worse) pair, or only best vs worst",
                                 choices=["all", "best_worst"])
    on_invalid: str = setting("error", "bad rows: stop with an error naming file/row/field, or skip them (counted)",
                              choices=["error", "skip"])
    data_split: str | None = setting(None, "split name for `datasets` sources (default: train)")

    def validate(self):
        super().validate()
        # (--memory-budget chooses a micro-batch size that divides the batch: the given one is not used)
        if getattr(self, "memory_budget", None) is None:
            check_micro_batch(self.batch_size, self.micro_batch_size)
        if self.max_length is not None and self.max_prompt_length is not None and \
                self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length {self.max_prompt_length} must be smaller than --max-length "
                              f"{self.max_length} (the prompt and its response share --max-length)")
        return self


@dataclass
class LoraSettings:
    """LoRA adapters"""

    # One definition for every trainer that takes adapters (`train`/`sft`, `ppo`, `online`)
    lora_r: int = setting(0, "LoRA rank (0: full fine-tuning); the reference is the model with adapters disabled", ge=0)
    lora_alpha: float = setting(16.0, "LoRA scaling α", gt=0)
    lora_dropout: float = setting(0.0, "dropout on the LoRA path", ge=0, lt=1)
    lora_target_modules: str = setting("all-linear", "modules to adapt: all-linear, or a comma list (q_proj,v_proj)")

    def check_lora_settings(self) -> None:
        """An adapter setting moved from its default without --lora-r would be ignored: the run would
        fine-tune (and save) the whole model while its user expects an adapter. Refused, naming them."""
        if self.lora_r:
            return
        moved = [flag_name(f.name) for f in fields(LoraSettings)
                 if f.name != "lora_r" and getattr(self, f.name) != f.default]
        if moved:
            raise ConfigError(f"{', '.join(moved)} set without --lora-r: with rank 0 the run fine-tunes the whole "
                              "model and no adapter reads them; give the adapter's rank (e.g. --lora-r 16), or "
                              "leave them out for full fine-tuning")


@dataclass
class TrainConfig(PreferenceRunConfig, LoraSettings, FixedLengthSettings):
    """The loss, the reference, layouts, LoRA, several processes or nodes"""

    ref: str | None = setting(None, "reference model πref (default: a frozen copy of the starting policy)",
                              input=True)
    loss: str = setting("dpo", "loss: dpo, cdpo, ipo (summed log-probs), ipo_avg (per-token averages, as TRL's), "
                               "dpo_norm, robust, hinge, apo_zero, apo_down, exo_pair, nca_pair, reference_free, "
                               "simpo, orpo, plackett_luce (rankings), sft, unlikelihood, bco_pair, kto (unpaired "
                               "rows: prompt, completion, label); or a comma list summed "
                               "with --loss-weights, e.g. dpo,sft (see directpo.losses.LOSSES)")
    loss_weights: str = setting("", "weights of a comma-list --loss, e.g. --loss dpo,sft --loss-weights 1,0.5 "
                                    "(empty: 1 each)")
    beta: float = setting(0.1, "β: strength of the implicit KL penalty (paper default 0.1)", gt=0)
    label_smoothing: float = setting(0.0, "ε: probability that a preference label is flipped (conservative DPO with "
                                          "dpo/cdpo/dpo_norm; the known flip rate of robust; exo_pair's smoothing, "
                                          "1e-3 when 0)", ge=0, lt=0.5)
    simpo_gamma: float = setting(1.0, "γ of simpo: target reward margin; use with SimPO's β ≈ 2 (its authors start at "
                                      "γ/β = 0.5)", ge=0)
    orpo_lambda: float = setting(0.1, "λ of orpo: weight of the odds-ratio term (the paper's 0.1)", ge=0)
    # KTO (issue #16): unpaired rows, or pairs converted on request
    kto_desirable_weight: float = setting(1.0, "λ_D of kto: weight of the desirable examples' loss (the paper keeps "
                                               "λ_D·n_D / (λ_U·n_U) in [1, 4/3])", gt=0)
    kto_undesirable_weight: float = setting(1.0, "λ_U of kto: weight of the undesirable examples' loss", gt=0)
    pairs_to_unpaired: bool = setting(False, "for --loss kto: use each preference pair as two unpaired rows, the "
                                             "chosen response desirable and the rejected one undesirable")
    sft_weight: float = setting(0.0, "add this × the NLL per token of the best response to the loss (RPO-style)", ge=0)
    unlikelihood_weight: float = setting(1.0, "α of the unlikelihood loss: weight of the rejected-token term", ge=0)
    ranking_to_pairs: bool = setting(False, "expand ranked rows (K > 2) into pairs for pairwise losses")
    freeze_vision: bool = setting(True, "vision-language models: keep the vision tower and projector frozen, LoRA "
                                        "on the language model alone (--no-freeze-vision: train them too)")
    image_feature_cache: str = setting("1GiB", "vision-language models with --freeze-vision: keep each image's features "
                                               "(the frozen tower and projector's output) in memory up to this size, "
                                               "so the processor and the tower run once per image, not at every "
                                               "step (results unchanged); off: at every step",
                                       resumable=True)
    micro_batch_tokens: int = setting(0, "instead: fill each forward/backward with examples up to this many tokens "
                                         "(bounds activation memory whatever the lengths; 0: off)", ge=0)
    memory_budget: str | None = setting(None, "pick the micro-batch size for this much memory per process, e.g. 8GiB "
                                              "or 512MiB: the largest divisor of --batch-size whose longest possible "
                                              "micro-batch fits, from a measured activation cost per token (replaces "
                                              "--micro-batch-size; default: off)", resumable=True)
    precompute_ref: bool = setting(True, "compute reference log-probs once before training (cached on disk) and "
                                         "free the reference model; --no-precompute-ref runs the reference live at "
                                         "every step")
    ref_cache: str = setting("auto", "where reference log-prob tables are cached: auto (~/.cache/directpo, or "
                                     "$DIRECTPO_CACHE), off, or a directory", resumable=True)
    layout: str = setting("packed", "packed: each prompt computed once for all its responses, several examples per "
                                    "row (exact); padded: one padded row per prompt+response",
                          choices=["packed", "padded"])
    row_tokens: int = setting(0, "packed layout: tokens per row (0: the whole micro-batch in one unpadded row when "
                                 "the model attends segment by segment, else rows as long as its longest example)", ge=0)
    nproc: int = setting(0, "launch N data-parallel processes with torchrun (same global batch; gloo on CPU, NCCL "
                            "on GPU)", ge=0, resumable=True)
    # Several nodes (issue #17): the same command on every node, each launching --nproc processes;
    # `training.launch` turns these into torchrun's static rendezvous. Workers never see them.
    nnodes: int = setting(1, "nodes in the job; with N > 1, run the same command on every node, each with its "
                             "own --node-rank: each node launches --nproc processes (at least 1) with torchrun, "
                             "and --output-dir must be on a filesystem all nodes share", ge=1, resumable=True)
    node_rank: int = setting(0, "this node's number among the --nnodes nodes, 0 to N-1; node 0 holds global rank 0, "
                                "which writes the run directory", ge=0, resumable=True)
    master_addr: str = setting("127.0.0.1", "with --nnodes > 1: address or hostname of node 0, where the nodes "
                                            "meet; every node must reach it", resumable=True)
    master_port: int = setting(29500, "with --nnodes > 1: TCP port on node 0 where the nodes meet (free there)",
                               ge=1, le=65535, resumable=True)
    fsdp: bool = setting(False, "with several processes: shard the model with FSDP2 (fully_shard) instead of "
                                "replicating it; with --precision bf16 the blocks gather their weights and compute "
                                "in bf16 (FSDP2 MixedPrecisionPolicy: fp32 master weights, gradients reduced in fp32)", resumable=True)
    # Sharding and memory knobs for big models (issue #17). None of them changes the trajectory, so a
    # run may resume with others (`resumable=True`); `check_fsdp_settings` refuses what cannot work.
    checkpoint_format: str = setting("full", "checkpoints: full (whole weights as safetensors, gathered on rank 0) or "
                                             "sharded (torch.distributed.checkpoint: every rank writes its own shards, "
                                             "nothing gathered; resumes on any number of processes; needs a "
                                             "filesystem all nodes share)", choices=["full", "sharded"], resumable=True)
    fsdp_reshard_after_forward: bool = setting(True, "with --fsdp: free each block's gathered weights after its "
                                                     "forward and gather them again for the backward (less memory); "
                                                     "--no-fsdp-reshard-after-forward keeps them (less communication)", resumable=True)
    fsdp_cpu_offload: bool = setting(False, "with --fsdp: keep the weight shards, their gradients and the optimizer "
                                            "state in host memory and step the optimizer on the CPU (FSDP2 "
                                            "CPUOffloadPolicy); weights are copied to the device block by block", resumable=True)
    activation_checkpointing: bool = setting(False, "recompute each transformer block's activations in the backward "
                                                    "instead of keeping them (less memory, ~1/3 more compute; the "
                                                    "same gradients)", resumable=True)
    optimizer_offload: bool = setting(False, "keep the optimizer state (ZeRO-Offload style) in host memory: each "
                                             "step copies the gradients to the host, steps there and copies the "
                                             "weights back; the same arithmetic, less device memory (on the CPU "
                                             "it changes nothing; with --fsdp use --fsdp-cpu-offload)", resumable=True)
    new_adapter: bool = setting(False, "with --model ADAPTER_DIR: merge that adapter into its base and train a new "
                                       "LoRA (--lora-r) on top, πref = the adapter's model (what --lora-r with an "
                                       "adapter directory does anyway); without it the adapter is trained further")
    merge: bool = setting(False, "with LoRA: save the merged full model instead of the adapters")
    # QLoRA (issue #29): the frozen base quantized by bitsandbytes, the adapters in fp32 (`lora.check_quantize`)
    quantize: str = setting("none", "load the base model's linear layers quantized by bitsandbytes (QLoRA): nf4 or "
                                    "fp4 (4-bit), int8; needs --lora-r (only the adapters train; πref is the "
                                    "quantized base with adapters disabled) and `pip install 'directpo[quantize]'`",
                            choices=list(QUANTIZE))
    double_quant: bool = setting(True, "with --quantize nf4/fp4: quantize the 4-bit blocks' scales too (QLoRA's "
                                       "double quantization, ~0.4 bit per parameter less); --no-double-quant keeps "
                                       "them fp32")
    ref_sync_every: int = setting(0, "TR-DPO (Gorbatovski et al. 2024): every N steps move the reference towards the "
                                     "policy, πref ← α·πθ + (1−α)·πref; the reference then runs live (0: never, "
                                     "the paper's fixed πref)", ge=0)
    ref_sync_mix: float = setting(0.5, "TR-DPO's α: 1 replaces πref by the policy (hard update), below 1 mixes the "
                                       "weights (soft update)", gt=0, le=1)

    def validate(self) -> "TrainConfig":
        super().validate()
        self.check_fsdp_settings()
        check_quantize(self)
        self.check_launch_settings()
        if self.optimizer_offload and self.fsdp:  # FSDP2 offloads the sharded state itself
            raise ConfigError("--optimizer-offload is for one process's optimizer; with --fsdp use "
                              "--fsdp-cpu-offload, which keeps the sharded state in host memory")
        if self.image_feature_cache != "off":
            from ..memory import parse_size

            parse_size(self.image_feature_cache, "--image-feature-cache")
        if self.memory_budget is not None:
            from ..memory import parse_size

            parse_size(self.memory_budget, "--memory-budget")
            if self.micro_batch_tokens:
                raise ConfigError("--memory-budget picks the micro-batch size; it does not combine with "
                                  "--micro-batch-tokens (drop one)")
            if self.fsdp:  # its probe would run outside FSDP's collectives; `directpo plan` covers sharding
                raise ConfigError("--memory-budget does not plan sharded runs yet; size an --fsdp run with "
                                  "`directpo plan` and give --micro-batch-size")
        from ..losses import get_loss

        spec = get_loss(self.loss, self.loss_weights)
        if self.ref_sync_every:
            why = ("the loss uses no reference" if not spec.needs_reference else
                   "a sharded model's reference must be precomputed" if self.fsdp else None)
            if why:
                raise ConfigError(f"--ref-sync-every: {why}; TR-DPO needs a reference model of its own")
            if self.lora_r and self.ref and self.ref != self.model:  # (`training.lora_reference`)
                raise ConfigError("--ref-sync-every with LoRA: πref is the base plus an adapter of its own, synced "
                                  "from the policy's; leave --ref out")
        self.check_lora_settings()
        if self.new_adapter and not self.lora_r:
            raise ConfigError("--new-adapter trains a new LoRA on the merged --model adapter: give its rank, --lora-r")
        from .adapters import check_adapter_settings

        check_adapter_settings(self)  # reads the adapter directories' configs (no weights)
        self.check_loss_settings(spec)
        self.check_unpaired_settings(spec)
        return self

    def unread_settings(self) -> frozenset:
        """The loss settings the chosen loss does not read: they change nothing in this run, so a
        record that differs in them (a run made before they were refused) still matches."""
        from ..losses import LOSS_SETTINGS, get_loss

        return frozenset(LOSS_SETTINGS) - set(get_loss(self.loss, self.loss_weights).params)

    def check_loss_settings(self, spec) -> None:
        """A loss setting moved from its default that the chosen loss does not read would change
        nothing (`--loss ipo --label-smoothing 0.1` trains plain IPO): refused, naming both, before
        anything loads. What each loss reads is its registry entry's `params`; a comma list reads
        the union of its parts'. A setting left at its default is never an error."""
        from dataclasses import fields

        from ..config import flag_name
        from ..losses import LOSS_SETTINGS

        defaults = {f.name: f.default for f in fields(self)}
        for name in LOSS_SETTINGS:
            if name not in spec.params and getattr(self, name) != defaults[name]:
                reads = ", ".join(flag_name(n) for n in spec.params) or "none of the loss settings"
                raise ConfigError(f"{flag_name(name)}: the '{self.loss}' loss does not read it (it reads {reads})")

    def check_unpaired_settings(self, spec) -> None:
        """KTO's settings that cannot work with the loss given, refused before anything loads."""
        if self.pairs_to_unpaired and not spec.unpaired:
            raise ConfigError(f"--pairs-to-unpaired makes unpaired rows, for --loss kto; the '{self.loss}' loss "
                              "takes pairs as they are")
        if spec.unpaired and self.sft_weight:  # it would train on the undesirable completions too
            raise ConfigError("--sft-weight adds the NLL of each row's first response: with kto's unpaired rows "
                              "that includes the undesirable completions; leave it at 0")

    def check_launch_settings(self) -> None:
        """The node settings that cannot name a node of the job (their ranges: `check_ranges`)."""
        if self.node_rank >= self.nnodes:
            raise ConfigError(f"--node-rank must be < --nnodes (the nodes are numbered 0 to {self.nnodes - 1}); "
                              f"got --node-rank {self.node_rank} with --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.master_addr.strip():
            raise ConfigError("--master-addr is empty: with --nnodes > 1 it must name node 0 (an address or a "
                              "hostname every node reaches)")

    def check_fsdp_settings(self) -> None:
        """The sharding knobs that cannot work together, refused before anything loads."""
        # (--fsdp with --merge is refused where sharding starts, `loop.check_sharding`.)
        off = [flag for flag, on in (("--fsdp-cpu-offload", self.fsdp_cpu_offload),
                                     ("--no-fsdp-reshard-after-forward", not self.fsdp_reshard_after_forward)) if on]
        if off and not self.fsdp:
            raise ConfigError(f"{off[0]} shapes FSDP sharding: it needs --fsdp (and several processes)")


@dataclass
class PipelineConfig(TrainConfig):
    """The SFT stage of `directpo pipeline` (each unset: the DPO stage's setting)"""

    sft_lr: float | None = setting(None, "SFT stage learning rate (default: --lr)", gt=0)
    sft_max_steps: int | None = setting(None, "SFT stage steps (default: --max-steps / --epochs)", ge=1)
    sft_epochs: float | None = setting(None, "SFT stage epochs (default: --epochs)", gt=0)
    sft_optimizer: str | None = setting(None, "SFT stage optimizer (default: --optimizer)",
                                        choices=list(OPTIMIZERS))

    def stage_settings(self) -> tuple[TrainConfig, dict]:
        """(the pipeline's TrainConfig, the SFT stage's own settings that were set, unprefixed)."""
        from dataclasses import fields

        base = TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})
        own = {n: getattr(self, n) for n in ("sft_lr", "sft_max_steps", "sft_epochs", "sft_optimizer")}
        return base, {k: v for k, v in own.items() if v is not None}
