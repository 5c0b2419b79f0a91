"""Everything a DPO/SFT run prepares before its first step, so the loop (`training.loop`) reads top to
bottom: the data (load, validate, tokenize; the checks of `directpo inspect`), the models (policy
and πref, whole or sharded over FSDP ranks without any rank holding the whole model) and the
reference log-prob tables (computed once, cached on disk, shared between processes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from ..console import log
from ..data import SkipReport, TokenizeStats, load_examples, tokenize_examples
from ..data.checks import red_flags, summarize, summary_paragraph
from ..data.formats import DataError, pairs_to_unpaired, ranking_to_pairs
from ..data.tokenize import pair_mismatched
from ..errors import UserValueError
from ..logprobs import dataset_logps
from ..losses import LossSpec, get_loss
from ..models import check_vocab, empty_model, enable_activation_checkpointing, freeze, load_model
from ..reference import cached_table, default_cache_dir, model_fingerprint, open_cache
from ..vision import empty_vision_model, is_vision_model, load_vision_model
from .adapters import add_reference_adapter, adapt_policy, base_key, read_adapter_dir
from .config import TrainConfig
from .distributed import Dist, GatheredState, fsdp_kwargs
from .lora import adapters_disabled, apply_lora, apply_lora_to_empty, is_lora, quantize_kwargs
from .vlm import cache_image_features, check_sharded_rows, lora_targets, prepare_vision

# ----------------------------------------------------------------------------------------------
# Data


def prepare_data(data_path: str, tokenizer, cfg: TrainConfig, what: str, processor=None):
    """Load, validate and tokenize a data file into the shape the loss takes; report what was
    skipped or truncated. `processor`: a vision-language model's (`training.vlm.run_processor`),
    which tokenizes the rows with their images."""
    loss = get_loss(cfg.loss, cfg.loss_weights)
    report, stats = SkipReport(), TokenizeStats()
    examples = load_examples(data_path, on_invalid=cfg.on_invalid, split=cfg.data_split, report=report)
    with_images = sum(bool(ex.images) for ex in examples)
    if with_images and processor is None:  # text-only tokenizing would drop the placeholders: never train blind
        rows = f"{with_images} row{'s' * (with_images != 1)}"
        raise UserValueError(f"images in {data_path} ({rows}), but {cfg.model} is a text-only model: give a "
                             "vision-language model (one with a vision tower), or remove the 'images'/'image' field "
                             "to train on the text alone")
    examples = unpaired_rows(examples, cfg) if loss.unpaired else preference_rows(examples, cfg, loss)
    if processor is not None and cfg.fsdp:
        check_sharded_rows(examples)
    if processor is not None and cfg.fixed_length:
        raise UserValueError("--fixed-length reads plain text rows; a vision-language model's rows are conversations "
                             "(its chat template ends every turn)")
    if processor is not None:
        from ..data.vision_tokenize import tokenize_vision_examples

        tokenized, stats = tokenize_vision_examples(examples, processor, cfg.max_length, cfg.max_prompt_length,
                                                    on_invalid=cfg.on_invalid, skipped=report)
    else:
        tokenized = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                      on_invalid=cfg.on_invalid, report=report, stats=stats,
                                      fixed_length=cfg.fixed_length)
    if loss.unpaired:  # KTO: each example gets its mismatched completion, for the reference point z0
        tokenized = pair_mismatched(tokenized, cfg.seed, cfg.max_length)
    log(f"{what}: {len(tokenized)} examples from {data_path}; {report.summary()}; {stats.summary()}")
    return tokenized, report, stats


def preference_rows(examples, cfg: TrainConfig, loss: LossSpec) -> list:
    """The rows as a preference (or SFT) loss takes them, or an error naming the first that does not fit."""
    labelled = next((ex for ex in examples if ex.label is not None), None)
    imitates = loss.rows == "completions"  # (sft: its rows are the best response alone)
    if labelled is not None and imitates:  # Preferred-FT on unpaired rows: imitate the desirable ones
        kept = [ex for ex in examples if ex.label is not False]
        log(f"sft: {len(examples) - len(kept)} undesirable rows (label false) are not imitated; {len(kept)} kept")
        if not kept:
            raise DataError(labelled.source, labelled.row, "label", "every row is undesirable (label false): "
                            "nothing to imitate")
        examples, labelled = kept, None
    if labelled is not None:
        raise DataError(labelled.source, labelled.row, "label",
                        f"an unpaired row (prompt, completion, label), but the '{cfg.loss}' loss takes "
                        f"preference {loss.rows}: train unpaired rows with --loss kto")
    if imitates:  # Preferred-FT: only the best response is a target
        examples = [replace(ex, responses=ex.responses[:1], label=None) for ex in examples]
    else:
        single = next((ex for ex in examples if len(ex.responses) < 2), None)
        if single is not None:
            raise DataError(single.source, single.row, None, f"the '{cfg.loss}' loss needs ≥ 2 responses per row; "
                                                             "this row has one (a prompt/completion row is for "
                                                             "`directpo sft`)")
    if cfg.ranking_to_pairs:
        examples = ranking_to_pairs(examples, cfg.ranking_pairs)
    if loss.pairwise:
        ranked = next((ex for ex in examples if len(ex.responses) != 2), None)
        if ranked is not None:
            raise DataError(ranked.source, ranked.row, None, f"the '{cfg.loss}' loss takes pairs, this row has "
                                                             f"{len(ranked.responses)} ranked responses: use --loss "
                                                             "plackett_luce, or --ranking-to-pairs to expand rankings "
                                                             "into pairs")
    return examples


def unpaired_rows(examples, cfg: TrainConfig) -> list:
    """The rows as KTO takes them: unpaired (prompt, completion, label) rows, and with
    --pairs-to-unpaired each pair as a desirable and an undesirable row; a pair without that flag is
    an error saying how to convert."""
    if cfg.ranking_to_pairs:
        examples = ranking_to_pairs(examples, cfg.ranking_pairs)
    if cfg.pairs_to_unpaired:
        return pairs_to_unpaired(examples)
    paired = next((ex for ex in examples if ex.label is None), None)
    if paired is not None:
        what = "a preference pair" if len(paired.responses) == 2 else \
            f"a ranking of {len(paired.responses)} responses" if len(paired.responses) > 2 else "a completion"
        raise DataError(paired.source, paired.row, "label",
                        f"missing: the '{cfg.loss}' loss takes unpaired rows (prompt, completion, label: true for "
                        f"desirable, false for undesirable), this row is {what}; pass --pairs-to-unpaired to use "
                        "each pair's chosen response as desirable and its rejected one as undesirable")
    return examples


def kto_balance(examples, cfg: TrainConfig) -> None:
    """A warning when λ_D·n_D / (λ_U·n_U) is outside [1, 4/3], the range the KTO paper recommends
    (weigh the desirable examples so that they match or slightly outweigh the undesirable ones)."""
    n_d = sum(bool(ex.label) for ex in examples)
    n_u = len(examples) - n_d
    if not n_d or not n_u:
        log(f"warning: kto: the training data has only {'desirable' if n_d else 'undesirable'} examples")
        return
    ratio = cfg.kto_desirable_weight * n_d / (cfg.kto_undesirable_weight * n_u)
    if not 1 <= ratio <= 4 / 3:
        log(f"warning: kto: λ_D·n_D / (λ_U·n_U) = {ratio:.3g} ({n_d} desirable, {n_u} undesirable examples); the "
            "paper recommends 1 to 4/3: set --kto-desirable-weight / --kto-undesirable-weight to bring it there")


def check_data(examples, tokenizer, stats, report, fixed_length: bool = False) -> str:
    """The cheap checks of `directpo inspect` before step 1: one paragraph in the log (and the model
    card), a warning line for each red flag (length bias, duplicates, pairs truncated away, ...)."""
    summary = summarize(examples, tokenizer, stats, report)
    flags = red_flags(summary, fixed_length)
    paragraph = summary_paragraph(summary, flags)
    log(f"data: {paragraph}")
    for flag in flags:
        log(f"warning: {flag} (directpo inspect --data ... writes the full report)")
    return paragraph


# ----------------------------------------------------------------------------------------------
# Models: the policy, πref, and the reference log-prob tables


@dataclass
class Sources:
    """A run's inputs given as objects (the Python API), used instead of loading what the settings
    name: a model (`PreTrainedModel`, or a `PeftModel` to go on training its adapters), its
    tokenizer, a reference model. The settings still name them (for the records and the card)."""

    model: torch.nn.Module | None = None
    tokenizer: object = None
    ref_model: torch.nn.Module | None = None


def load_policy_and_reference(cfg: TrainConfig, tokenizer, device, loss_spec: LossSpec, empty: bool,
                              sources: Sources | None = None, vision: bool = False):
    """`_load_policy_and_reference`, a VLM's frozen image features kept (--image-feature-cache; not
    under --fsdp, which loads through `load_sharded`)."""
    policy, ref_model = _load_policy_and_reference(cfg, tokenizer, device, loss_spec, empty, sources, vision)
    if vision:
        cache_image_features(cfg, policy, ref_model)
    return policy, ref_model


def _load_policy_and_reference(cfg: TrainConfig, tokenizer, device, loss_spec: LossSpec, empty: bool,
                               sources: Sources | None = None, vision: bool = False):
    """(policy, πref model or None). πref: the starting policy, frozen (paper §4), unless another
    model is given. When its log-probs are precomputed, the untouched policy itself serves (no
    second copy); with LoRA, the same network with adapters disabled. `vision`: a vision-language
    model (`AutoModelForImageTextToText`), its vision side frozen unless --no-freeze-vision."""
    sources = sources or Sources()
    adapter = read_adapter_dir(cfg.model) if sources.model is None else None  # --model ADAPTER_DIR: its base
    if sources.model is not None:
        if cfg.lora_r and is_lora(sources.model):
            raise UserValueError("the model given already has LoRA adapters: leave lora_r at 0 to train them, or pass "
                                 "its base model to add new ones")
        if quantize_kwargs(cfg):  # (a model already quantized is used as it is, with quantize left at none)
            raise UserValueError(f"quantize={cfg.quantize!r} loads the model by name; a model given as an object is "
                                 "used as it is: load it quantized yourself (transformers' BitsAndBytesConfig)")
        policy = sources.model.to(device)
    elif vision:
        policy = load_vision_model(adapter.root if adapter else cfg.model, device,
                                   trust_remote_code=cfg.trust_remote_code, **quantize_kwargs(cfg))
    else:
        policy = load_model(adapter.root if adapter else cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                            empty=empty, **quantize_kwargs(cfg))
    check_vocab(tokenizer, policy, cfg.model)
    if vision:
        prepare_vision(policy, cfg.freeze_vision)
    if adapter is not None:  # continue training its adapter, or (--lora-r) merge it for a new one
        policy = adapt_policy(policy, adapter, cfg.lora_r)
    if cfg.lora_r:
        targets = lora_targets(policy, cfg.lora_target_modules, cfg.freeze_vision) if vision else \
            cfg.lora_target_modules
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, targets, cfg.lora_dropout)
    policy.train()
    if not loss_spec.needs_reference:
        return policy, None
    if sources.ref_model is None and reference_adapter(cfg, policy, adapter):
        return policy, policy  # πref: the same network with its reference adapter, or adapters disabled
    if sources.ref_model is not None or (cfg.ref and cfg.ref != cfg.model):
        load = (lambda name: load_vision_model(name, device, trust_remote_code=cfg.trust_remote_code,
                                               **quantize_kwargs(cfg))) if vision \
            else (lambda name: load_model(name, device, trust_remote_code=cfg.trust_remote_code, empty=empty,
                                          **quantize_kwargs(cfg)))
        ref_model = freeze(sources.ref_model.to(device) if sources.ref_model is not None else load(cfg.ref))
        check_vocab(tokenizer, policy, cfg.model, ref=ref_model, ref_name=cfg.ref)
        if cfg.ref_sync_every:
            check_same_shapes(policy, ref_model, cfg.model, cfg.ref)
        return policy, ref_model
    # LoRA: πref is the same network (adapters disabled, or TR-DPO's reference adapter: `loop.setup`)
    if is_lora(policy) or (cfg.precompute_ref and not cfg.ref_sync_every):
        return policy, policy
    return policy, freeze(copy.deepcopy(policy))


def reference_adapter(cfg: TrainConfig, policy, adapter) -> bool:
    """Whether πref is the policy's own network (one copy of the base), and if so set it up: --ref
    ADAPTER_DIR (loaded as the "reference" adapter on the policy's base), the --model adapter's own
    model (trained further: a frozen copy as the reference adapter; merged for a new adapter: the
    new adapters disabled), or --ref naming that adapter's base (adapters disabled)."""
    def ref_names(path: str) -> bool:
        return bool(cfg.ref) and base_key(cfg.ref) == base_key(path)

    same = adapter is not None and ref_names(adapter.path)
    its_base = adapter is not None and ref_names(adapter.base)
    # --ref naming the --model adapter itself is its default πref (`directpo pipeline`'s stage 2 names both)
    ref = None if same or its_base else read_adapter_dir(cfg.ref, "--ref")  # (refusals: `check_adapter_settings`)
    if ref is not None:
        if not is_lora(policy):
            raise UserValueError(f"--ref {cfg.ref}: a reference adapter shares the policy's base weights, which full "
                                 "fine-tuning changes: add --lora-r")
        add_reference_adapter(policy, ref, adapter.base if adapter is not None else cfg.model, "--ref",
                              continued=False)
        return True
    if adapter is None or its_base and cfg.lora_r:  # (merged: the base alone is no longer in memory)
        return False
    if its_base:
        log(f"--ref {cfg.ref}: πref = the base of --model {cfg.model} (its adapter disabled; one copy of the base)")
        return True
    if cfg.lora_r:  # merged: πref is the merged model, the new adapters disabled
        return same
    if cfg.ref and not same:
        return False  # a whole model of its own
    add_reference_adapter(policy, adapter, adapter.base, "--model", continued=True)
    return True


def load_sharded(cfg: TrainConfig, d: Dist, tokenizer, loss_spec: LossSpec):
    """`load_policy_and_reference` under FSDP, with no rank holding a whole model: every rank builds
    the policy on the meta device, adds LoRA (adapters drawn as `apply_lora` would draw them),
    shards it and fills its own shards from the safetensors files (`Dist.shard_model(weights=...)`).
    πref is the sharded starting policy itself (--fsdp precomputes its log-probs), or --ref loaded
    the same way, freed once its tables are computed. A vision-language model is built as
    AutoModelForImageTextToText, its vision side frozen (--freeze-vision) before it is sharded."""
    vision = is_vision_model(cfg.model, cfg.trust_remote_code)  # (AutoModelForImageTextToText on meta)
    empty = empty_vision_model if vision else empty_model
    policy, initial = empty(cfg.model, trust_remote_code=cfg.trust_remote_code), {}
    check_vocab(tokenizer, policy, cfg.model)
    if vision:  # frozen before sharding: FSDP keeps each parameter's requires_grad
        prepare_vision(policy, cfg.freeze_vision)
    if cfg.lora_r:
        targets = lora_targets(policy, cfg.lora_target_modules, cfg.freeze_vision) if vision else \
            cfg.lora_target_modules
        policy, initial = apply_lora_to_empty(policy, cfg.lora_r, cfg.lora_alpha, targets, cfg.lora_dropout)
    policy.train()
    if cfg.activation_checkpointing:  # on the blocks before they are sharded, as without meta loading
        enable_activation_checkpointing(policy)
    ref_model = None
    if loss_spec.needs_reference and cfg.ref and cfg.ref != cfg.model:
        ref_model = freeze(empty(cfg.ref, trust_remote_code=cfg.trust_remote_code))
        check_vocab(tokenizer, policy, cfg.model, ref=ref_model, ref_name=cfg.ref)
    policy = d.shard_model(policy, **fsdp_kwargs(cfg), weights=cfg.model, initial=initial)
    if ref_model is not None:
        return policy, d.shard_model(ref_model, **fsdp_kwargs(cfg), weights=cfg.ref)
    return policy, (policy if loss_spec.needs_reference else None)


def check_same_shapes(policy, ref_model, policy_name: str, ref_name: str) -> None:
    """TR-DPO mixes the weights of policy and reference: they must be the same architecture."""
    a = {k: v.shape for k, v in policy.state_dict().items()}
    b = {k: v.shape for k, v in ref_model.state_dict().items()}
    if a != b:
        raise UserValueError(f"--ref-sync-every: {ref_name} and {policy_name} are not the same architecture (their "
                             "weights cannot be mixed); leave --ref out (πref = the starting policy)")


def check_sharding(cfg: TrainConfig, loss_spec: LossSpec) -> None:
    """What FSDP cannot do, refused before anything is loaded."""
    if cfg.merge:  # merging adapters into sharded weights would need the whole model on one rank
        raise UserValueError("--fsdp does not combine with --merge: save the adapters, merge them afterwards")
    if loss_spec.needs_reference and not cfg.precompute_ref:
        raise UserValueError("--fsdp needs precomputed reference log-probs (drop --no-precompute-ref)")


def used_examples(cfg: TrainConfig, n: int, batch_order) -> list[int] | None:
    """The training examples (indices, sorted) that the batches of steps 1..--max-steps draw, in
    the order `batch_order(n, batch_size, seed)` (`training.loop`) gives them; None when the run
    draws every one: no --max-steps (whole epochs), or enough steps to cover an epoch."""
    if not cfg.max_steps or cfg.max_steps * cfg.batch_size >= n:
        return None
    order = batch_order(n, cfg.batch_size, cfg.seed)
    return sorted({i for _ in range(cfg.max_steps) for i in next(order)[1]})


def reference_tables(cfg: TrainConfig, d: Dist, ref_model, train_set, eval_set, collate, device, batch_order=None):
    """(train table or None, eval table or None): reference log-probs that never change, computed
    once (cached on disk across runs), each process computing its share of the examples from its
    whole or sharded model and the shares gathered onto every process (`_split_table`). The eval
    table always exists when there is an eval set and a reference; the train table only with
    precompute_ref. `batch_order`: the run's batch order (`loop.batch_order`); given, a run whose
    --max-steps draws fewer than all the examples computes their rows alone (`used_examples`)."""
    if ref_model is None:
        return None, None
    sharded = cfg.fsdp and d.enabled
    cache_dir = {"off": None, "auto": default_cache_dir()}.get(cfg.ref_cache, cfg.ref_cache)
    # a sharded model's fingerprint gathers each tensor in turn: every rank takes part (the same
    # hash as the whole model's, so the cache is shared with unsharded runs)
    model_fp = (model_fingerprint(GatheredState(ref_model) if sharded else ref_model)
                if (d.main or sharded) and cache_dir is not None else None)
    ac_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    # rank 0 alone reads and writes the cache; the ranks compute the rows it lacks together
    cache = open_cache(cache_dir, model_fp, cfg.precision, log) if d.main and model_fp is not None else None

    def compute(examples, what):
        shown = cfg.progress and d.main  # one progress bar: the ranks' shares are alike
        with adapters_disabled(ref_model):
            return dataset_logps(ref_model, examples, collate, cfg.micro_batch_size, device, ac_dtype,
                                 progress=f"reference log-probs ({what})" if shown else None)

    eval_ref = _split_table(d, eval_set, "eval", compute, cache) if eval_set else None
    train_ref = None
    if cfg.precompute_ref and not cfg.ref_sync_every:  # TR-DPO's reference moves: no fixed table
        used = used_examples(cfg, len(train_set), batch_order) if batch_order is not None else None
        if used is None:
            train_ref = _split_table(d, train_set, "train", compute, cache)
        else:
            log(f"reference log-probs: {len(used)} of {len(train_set)} examples (the ones --max-steps "
                f"{cfg.max_steps} uses)")
            train_ref = _rows_of(_split_table(d, [train_set[i] for i in used], "train", compute, cache),
                                 used, train_set)
    return train_ref, eval_ref


def _rows_of(part: torch.Tensor, used: list[int], examples) -> torch.Tensor:
    """The whole table's shape, (examples × the widest ranking), holding `part`'s rows at `used`
    and NaN elsewhere (rows no step reads). The cache holds `part`'s rows, each under its own
    example's key: a later run that draws more examples computes only the others."""
    width = max(len(ex.response_ids) for ex in examples)
    full = torch.full((len(examples), width), float("nan"), dtype=part.dtype)
    full[used, :part.shape[1]] = part
    return full


def _split_table(d: Dist, examples, what: str, compute, cache):
    """A reference table: the rows rank 0 finds in the cache, the others computed by all processes,
    each its share (`_shares`), gathered whole onto every process; rank 0 adds them to the cache
    and, when it served some rows from it, sends the whole table round. Rank 0 first says which
    rows it lacks: under FSDP every rank must take part in every forward. Every rank holds the same
    examples in the same order (the data preparation is deterministic), so each knows every rank's
    share without asking.

    A row's log-probs can differ in the last bits from those of the whole table computed in one
    process: its micro-batch companions differ, and with them the padding and the matmul shapes
    (float re-association, ~1e-7 relative)."""
    if not d.enabled:
        return cached_table(cache, examples, lambda exs: compute(exs, what), log)[0]

    agreed: list[int] = []  # the rows every rank computes: those rank 0 lacks

    def agree(missing: list[int]) -> list[int]:
        flags = torch.zeros(len(examples))
        flags[missing] = 1.0
        agreed[:] = d.broadcast(flags if d.main else None, shape=(len(examples),)).nonzero().flatten().tolist()
        return agreed

    table, _ = cached_table(cache, examples, lambda exs: _computed(d, exs, what, compute), log, agree=agree)
    if len(agreed) < len(examples):  # rank 0 alone read the cached rows
        table = d.broadcast(table if d.main else None, shape=tuple(table.shape))
    return table


def _computed(d: Dist, examples, what: str, compute) -> torch.Tensor:
    """The table of `examples` computed by all processes, each its share, gathered onto every one."""
    own, padded = _shares(examples, d.world)
    mine = compute([examples[i] for i in padded[d.rank]], what)
    # rankings: a share's table is as wide as its own longest ranking; all_gather needs one width
    width = max(len(ex.response_ids) for ex in examples)
    mine = torch.nn.functional.pad(mine, (0, width - mine.shape[1]), value=float("nan"))  # NaN: no response
    full = torch.full((len(examples), width), float("nan"))
    for idx, rows in zip(own, d.all_gather_rows(mine)):
        full[idx] = rows[:len(idx)]  # the padding's rows come last: dropped
    log(f"reference log-probs ({what}): {d.world} processes computed {len(padded[0])} examples each "
        f"({len(examples)} in all)")
    return full


def _shares(examples, world: int) -> tuple[list[list[int]], list[list[int]]]:
    """(each rank's examples, the same padded to one count), as indices. Round robin over the
    examples sorted by length: the ranks get similar numbers of tokens, and since `dataset_logps`
    sorts a share and cuts it into micro-batches by count, the ranks' j-th micro-batches are of
    similar lengths too (under FSDP they run in lockstep: each forward gathers the weights
    collectively). The padding, the shortest example, gives every rank the same number of
    forwards (FSDP needs it; it also spares an empty share when there are fewer examples than
    ranks); it costs at most one short example per rank."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_tokens)
    own = [order[r::world] for r in range(world)]
    n = len(own[0])
    return own, [s + order[:1] * (n - len(s)) for s in own]
