"""Multi-process data parallelism: the only module that touches `torch.distributed`.

`directpo train --nproc N ...` (training/launch.py re-runs the command under torchrun; `--nnodes`,
`--node-rank`, `--master-addr`, `--master-port` for several nodes) or a plain `torchrun ... -m
directpo train ...` starts the processes; each takes every N-th example of each global batch (the
batch is sorted by length first, so ranks get similar work). Gradients are summed over ranks
before the optimizer step, and every rank scales its loss by 1/global batch, so the update is
exactly the single-process one at the same global batch (DDP semantics). Metrics are summed over
ranks; only rank 0 writes files. gloo on CPU, NCCL on GPU.

With `--fsdp`, FSDP2 (`fully_shard`) shards the transformer blocks over the ranks for models that
do not fit one device: every rank builds the model on the meta device and reads only its own
shards from the safetensors files (`shard_model`); a vision-language model's units are its language
model's blocks and its vision side (tower + projector) as one. Checkpoints: the default `full` format gathers
the trainable weights and optimizer state onto rank 0 (`gather_state`, an ordinary checkpoint) and
resuming broadcasts them back from rank 0 (`load_state`), each rank keeping its shard;
`--checkpoint-format sharded` has every rank write and read its own shards with
torch.distributed.checkpoint (DCP), nothing gathered, and DCP reshards on load, so such a
checkpoint resumes on any number of processes. The final model is streamed by training/export.py,
one tensor gathered at a time. The reference tables are computed by all ranks, each its share of
the examples, gathered with `all_gather_rows` (training/prepare.py).

Several nodes: devices follow LOCAL_RANK (the rank on this node); the data split, the metric sums
and "rank 0 writes" follow RANK and WORLD_SIZE (over all nodes). The run directory and checkpoints
are written by global rank 0 (a sharded checkpoint's shards by every rank) and read back by every
rank on --resume: the output directory must be on a filesystem all nodes share.

We all-reduce gradients ourselves rather than wrapping the model in DistributedDataParallel:
directpo's log-prob path calls the backbone and LM head directly (to skip full-vocabulary logits),
which DDP's forward hooks would not see.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserValueError
from ..models import unwrap_peft


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of a global batch: no example twice, none left out."""
        return indices[self.rank::self.world] if self.enabled else indices

    def all_reduce_grads(self, params) -> None:
        """Sum gradients over ranks (parameters FSDP shards are reduced by FSDP itself)."""
        if not self.enabled:
            return
        from torch.distributed.tensor import DTensor

        for p in params:
            if isinstance(p, DTensor):
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def sum_stats(self, stats: dict[str, float]) -> dict[str, float]:
        if not self.enabled:
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.tolist()))

    def broadcast(self, tensor: torch.Tensor | None, shape=None, dtype=torch.float32) -> torch.Tensor:
        """Rank 0's tensor on every rank (others pass None and the shape)."""
        if not self.enabled:
            return tensor
        shape_t = torch.tensor(list(tensor.shape) if self.main else [0] * len(shape), device=self._device())
        dist.broadcast(shape_t, 0)
        buf = tensor.to(self._device()) if self.main else torch.empty(shape_t.tolist(), dtype=dtype,
                                                                        device=self._device())
        dist.broadcast(buf, 0)
        return buf.cpu()

    def all_gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `rows`, in rank order, on every rank (on the CPU). Every rank must call,
        with a tensor of the same shape and dtype: all_gather moves fixed-size buffers."""
        if not self.enabled:
            return [rows]
        local = rows.contiguous().to(self._device())
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return [p.cpu() for p in parts]

    def shard_model(self, model, reshard_after_forward: bool = True, cpu_offload: bool = False,
                    bf16: bool = False, weights: str | None = None, initial: dict | None = None):
        """FSDP2: shard every transformer block, the backbone (embeddings, final norm) and the LM
        head over the ranks. directpo's log-prob path calls the head module itself
        (`logprobs.head_logprobs`), so FSDP gathers its weight for that call and again for its
        backward and reduce-scatters its gradient, as for a block. The head is sharded in fp32 even
        under `bf16` (the log-prob path keeps the head's matmul in fp32: see
        `logprobs.label_logprobs`). Gradients are summed, not averaged (divide factor 1): every rank
        already scales its loss by 1/global batch.

        Meta loading (`weights` = the model's directory or hub id): every rank passes the model built
        with `empty_model` (parameters on meta; LoRA from `apply_lora_to_empty`, whose adapter values
        are `initial`), gets storage for its own shards after sharding, and fills them from the
        safetensors files one tensor at a time (`_fill_shards`): no rank ever holds the whole model,
        each holds its shards and, of a tensor not sharded on its rows, one being read.

        Without `weights`, only rank 0 holds the weights; ranks > 0 pass the model built on the meta
        device (`load_model(empty=True)`). After sharding, each rank gets storage for its shard alone
        and rank 0 broadcasts its weights into every rank's shard, so no rank > 0 holds a whole copy.

        The knobs (`fsdp_kwargs`): `reshard_after_forward` frees a block's gathered weights after
        its forward; `cpu_offload` keeps shards, gradients and optimizer state in host memory;
        `bf16` gathers and computes the blocks in bf16, keeping fp32 master weights and reducing
        gradients in fp32."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

        knobs = {"reshard_after_forward": reshard_after_forward}
        if cpu_offload:  # pinned host memory only where there is a device to copy to
            knobs["offload_policy"] = CPUOffloadPolicy(pin_memory=self._device().type == "cuda")
        if bf16:
            knobs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

        if getattr(model.config, "tie_word_embeddings", False):
            raise UserValueError("FSDP with tied input/output embeddings is not supported: the LM head would be "
                                 "sharded with the embedding; use data parallelism (drop --fsdp)")
        # Rank 0's whole weights, taken before sharding (the same storage as its parameters, no copy;
        # freed when this returns). Ranks > 0 pass {}: with broadcast_from_rank0 they still take part.
        full = model.state_dict() if self.main and weights is None else {}
        # meta loading: `to_empty` below would leave the buffers `empty_model` made (each module's own
        # values) as garbage; they are small and not sharded, so keep them aside
        buffers = {n: b.clone() for n, b in unwrap_peft(model).named_buffers()} if weights is not None else {}
        inner = unwrap_peft(model)
        vision = _vision_side(inner)  # a vision-language model's vision tower and projector
        if vision:
            _pin_weight_conversions(inner)
        # the checkpoint's names, read off the model as it was built (FSDP renames its classes)
        renamed = _file_keys(inner, initial or {}, weights) if weights is not None else {}
        for m in _blocks(inner):
            fully_shard(m, **knobs)  # with LoRA, a block's adapters are sharded with its frozen weights
        if vision:  # one unit: gathered once per forward of the tower (frozen or not: FSDP2 shards per parameter)
            fully_shard(vision, **knobs)
        fully_shard(inner.base_model, **knobs)
        if vision:
            _keep_output_capture(inner)
        head = inner.get_output_embeddings()
        if isinstance(head, torch.nn.Linear):  # (else the log-prob path uses the model's own logits)
            fully_shard(head, **{k: v for k, v in knobs.items() if k != "mp_policy"})
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        if weights is not None:
            model.to_empty(device=self._device())  # storage for this rank's shards only, uninitialised
            _fill_shards(model, weights, initial or {}, buffers, renamed)
            return model
        if not self.main:
            model.to_empty(device=self._device())  # storage for this rank's shards only, uninitialised
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Non-persistent buffers (rotary inv_freq, ...) are not in the state dict, and `to_empty` left
        # them as garbage: take rank 0's (buffers are not sharded, and small).
        for b in model.buffers():
            dist.broadcast(b, 0)
        return model

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """Global gradient norm over sharded (DTensor) and whole parameters, then clip."""
        from torch.distributed.tensor import DTensor

        sharded = torch.zeros((), dtype=torch.float64)
        whole = torch.zeros((), dtype=torch.float64)
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            if isinstance(g, DTensor):
                sharded += g.to_local().double().pow(2).sum().cpu()
            else:
                whole += g.double().pow(2).sum().cpu()
        if self.enabled:
            t = sharded.to(self._device())
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            sharded = t.cpu()
        total = (sharded + whole).sqrt().float()
        if max_norm and torch.isfinite(total) and total > max_norm:
            for g in grads:
                g.mul_(max_norm / (total.item() + 1e-6))
        return total

    def gather_state(self, model, optimizer) -> tuple[dict, dict] | None:
        """A sharded model's trainable weights and optimizer state, whole, on rank 0 (None elsewhere;
        every rank must call: it gathers). The optimizer state is re-keyed from parameter names to
        indices, the layout of `optimizer.state_dict()`, so an FSDP checkpoint is an ordinary one."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if not self.main:
            return None
        index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
        weights = {n: t.contiguous() for n, t in weights.items() if n in index}  # parameters, not buffers
        optim = {"state": {index[n]: s for n, s in optim["state"].items()},
                 "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]}
        return weights, optim

    def load_state(self, model, optimizer, weights: dict | None, optim: dict | None) -> None:
        """Inverse of `gather_state`: rank 0 passes a checkpoint's whole weights and optimizer state
        (others None); it broadcasts them and each rank keeps its shard, so only rank 0 ever holds
        the whole state. Every rank must call."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        if self.main:
            names = _param_names(model, optimizer)
            optim = {"state": {names[i]: s for i, s in optim["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]}
        # strict=False: a checkpoint holds trainable parameters only (the caller checked they are all
        # there). Two calls, not `set_state_dict`: given an empty model state (ranks > 0) that one
        # skips the model, and rank 0 would wait for them forever.
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_optimizer_state_dict(model, optimizer, optim or {}, options=options)
        set_model_state_dict(model, weights or {}, options=options)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _device(self):
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _blocks(inner) -> list:
    """The modules FSDP shards as units of their own: the transformer blocks (`_no_split_modules`);
    of a vision-language model, the language model's blocks only (its vision tower's blocks belong
    to the vision side's one unit, `_vision_side`)."""
    blocks = set(getattr(inner, "_no_split_modules", None) or [])
    root = inner
    if getattr(inner.config, "vision_config", None) is not None:
        from ..vision import language_model

        root = language_model(inner)
    return [m for m in root.modules() if type(m).__name__ in blocks]


def _vision_side(inner) -> list:
    """A vision-language model's vision tower and projector (one FSDP unit together); [] for a text model."""
    if getattr(inner.config, "vision_config", None) is None:
        return []
    from ..vision import vision_modules

    return list(vision_modules(inner).values())


def _pin_weight_conversions(inner) -> None:
    """transformers 5 saves a vision-language model under its family's original names (LLaVA's
    `language_model.model.layers...`), reverting the renaming it applies on load, which it looks up by
    each submodel's class name; FSDP2 renames the classes it wraps (`FSDPLlavaForConditionalGeneration`),
    and the lookup would then find another (or no) renaming: the export would not be what one
    process saves. The renaming is looked up now, on the classes as built, and kept on the model
    (`_weight_conversions`, where `from_pretrained` keeps it), as `revert_weight_conversion` would
    look it up for a model made from its config. A model from `from_pretrained` keeps its own."""
    if getattr(inner, "_weight_conversions", None) is not None:
        return
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers < 5 renames nothing
        return
    found = [c for c in get_model_conversion_mapping(inner, add_legacy=False) if not isinstance(c, PrefixChange)]
    inner._weight_conversions = found or None


def _keep_output_capture(inner) -> None:
    """transformers 5 records a submodel's hidden states (LLaVA reads its CLIP tower's) by hooks
    chosen from a registry keyed by the submodel's class name, filled at construction; FSDP2 gives
    each module it wraps a class of its own (`FSDPCLIPVisionModel`), which the registry lacks, so
    the hidden states would silently not be recorded. Each wrapped submodel's entry is added under
    its new class (the same `_can_record_outputs`, a class attribute the subclass inherits)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers < 5: outputs are returned, not recorded by hooks
        return
    for m in inner.modules():
        if hasattr(m, "_can_record_outputs") and not _CAN_RECORD_REGISTRY.get(m):
            _CAN_RECORD_REGISTRY[m] = m._can_record_outputs


class GatheredState:
    """A sharded model as `reference.model_fingerprint` reads it (its config and `state_dict()`),
    each tensor gathered whole in turn, so at most one whole tensor is held at a time. Every rank
    must read it, in the same order (each gather is collective)."""

    def __init__(self, model):
        self.model = model
        self.config = getattr(model, "config", None)

    def state_dict(self):
        return self

    def items(self):
        from torch.distributed.tensor import DTensor

        for name, t in self.model.state_dict().items():
            yield name, (t.full_tensor() if isinstance(t, DTensor) else t)


def _param_names(model, optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order `optimizer.state_dict()` numbers them."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def _fill_shards(model, weights: str, initial: dict, buffers: dict, renamed: dict) -> None:
    """Each parameter of a sharded model, materialised but uninitialised, filled with its values:
    from the checkpoint `weights` (safetensors), or from `initial` (LoRA adapters, by name in the
    inner model). A parameter sharded on dim 0 (FSDP2's layout) reads only this rank's rows of its
    tensor (`_own_rows`): with plain file reads into its shard (`safetensors_io.read_rows`), else from a
    safetensors slice; any other sharded one is read whole, one at a time, and keeps its chunk
    (`distribute_tensor` without communication, the chunking FSDP itself uses); a whole one takes
    it all. Buffers are put back from `buffers`, unless the checkpoint holds them (persistent ones).
    `renamed`: the tensors the files hold under another name (`_file_keys`)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    from ..models import safetensors_index
    from ..safetensors_io import read_rows

    inner = unwrap_peft(model)
    tie = getattr(inner, "tie_weights", None)
    if tie is not None and getattr(inner.config, "tie_word_embeddings", False):
        tie()  # `to_empty` gave each user of a tied parameter its own storage: one again, loaded once
    where = safetensors_index(weights)
    headers: dict[str, tuple[int, dict]] = {}  # per call: a file rewritten between loads is read anew
    with contextlib.ExitStack() as files:
        opened: dict[str, object] = {}

        def file(key: str):
            if where[key] not in opened:
                opened[where[key]] = files.enter_context(safe_open(where[key], framework="pt"))
            return opened[where[key]]

        for name, p in [*inner.named_parameters(), *inner.named_buffers()]:
            key = name.replace(".base_layer.", ".")  # PEFT's wrapped layer keeps the original weight there
            key = renamed.get(key, key)
            rows = _own_rows(p) if name not in initial and key in where else None
            if rows is not None:
                # read this rank's rows only, straight into its shard when the file holds them in
                # the shard's dtype (no mapping: the file's pages never count in this process's
                # memory); else from a safetensors slice of those rows
                if not read_rows(where[key], key, rows, p.to_local(), headers):
                    part = file(key).get_slice(key)[rows[0]:rows[1]]
                    p.to_local().copy_(part.to(p.device, p.dtype))
                    del part
                continue
            if name in initial:
                full = initial[name]
            elif key in where:
                full = file(key).get_tensor(key)
            elif name in buffers:
                full = buffers[name]
            else:
                raise UserValueError(f"{weights}: its safetensors files lack {key} (the model's configuration "
                                     "names it): the weights do not match the config")
            if isinstance(p, DTensor):
                local = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements,
                                          src_data_rank=None)
                p.to_local().copy_(local.to_local())
            else:
                p.copy_(full)
            del full  # one whole tensor at a time


def _file_keys(inner, initial: dict, weights: str) -> dict[str, str]:
    """{the model's name of a tensor: its name in the checkpoint's files}, for the tensors the files
    hold under another name: a vision-language model saved by transformers is written in its
    family's original layout (Qwen2-VL's `model.layers.0...` for `model.language_model.layers.0...`,
    LLaVA's `language_model.lm_head.weight` for `lm_head.weight`). transformers' own reverse
    conversion, the one `save_pretrained` applies, maps the names on meta stand-ins. Empty when the
    files use the model's names (every text model so far): nothing is converted."""
    from ..models import safetensors_index

    where = safetensors_index(weights)
    params = {n.replace(".base_layer.", ".") for n, _ in inner.named_parameters() if n not in initial}
    if all(k in where for k in params):
        return {}
    keys = params | {n.replace(".base_layer.", ".") for n, _ in inner.named_buffers()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 renames nothing
        return {}
    standins = {k: torch.empty(0, device="meta") for k in sorted(keys)}
    source = {id(t): k for k, t in standins.items()}
    reverted = revert_weight_conversion(inner, dict(standins))
    return {source[id(t)]: name for name, t in reverted.items()
            if id(t) in source and source[id(t)] not in where and name in where}


def _own_rows(p) -> tuple[int, int] | None:
    """(start, stop) of the rows of dim 0 this rank holds of a DTensor sharded on dim 0 over a 1-D
    mesh (FSDP2's layout: torch.chunk's, ceil(n / world) rows per rank, the last ranks' fewer or
    none); None for any other tensor (read whole, then chunked)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor) or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
        return None
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    size = -(-n // world)
    start = min(rank * size, n)
    stop = min(start + size, n)
    if tuple(p.to_local().shape) != (stop - start, *p.shape[1:]):  # not the layout assumed: read whole
        return None
    return start, stop


def save_shards(model, optimizer, path) -> None:
    """A sharded checkpoint's tensors (`--checkpoint-format sharded`): every process writes its own
    shards of the trainable weights and of the optimizer state into directory `path` with
    torch.distributed.checkpoint (a tensor every rank holds whole is written once). Nothing is
    gathered. Under torchrun every rank must call (DCP coordinates them); it returns once every
    rank's files are written and fsynced and rank 0 wrote the index."""
    import torch.distributed.checkpoint as dcp

    with _dcp_quiet():
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(path))


def load_shards(model, optimizer, path) -> None:
    """Inverse of `save_shards`, on any number of processes, FSDP or not: each rank reads its part
    of every tensor, whatever world size wrote them (DCP reshards on load). Every rank must call."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _dcp_state(model, optimizer)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = sorted(k for k in state["model"] if f"model.{k}" not in saved)
    if missing:
        raise UserValueError(f"{Path(path).parent}: checkpoint lacks {len(missing)} trainable tensors (e.g. "
                             f"{missing[0]}): it was made for another model")
    with _dcp_quiet():
        dcp.load(state, checkpoint_id=str(path))
    # strict=False: the frozen weights (LoRA's base) are not in a checkpoint; the trainable ones were
    # checked above
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _dcp_state(model, optimizer) -> dict:
    """{"model": trainable weights, "optimizer": its state}, keyed by parameter name. Under FSDP the
    tensors are this rank's shards (DTensors), which DCP saves, and loads in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": optim}


@contextlib.contextmanager
def _dcp_quiet():
    """DCP warns that it runs in one process when no process group exists: that is what we want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def fsdp_kwargs(cfg) -> dict:
    """`shard_model`'s knobs from a config (settings it lacks at their defaults)."""
    return {"reshard_after_forward": getattr(cfg, "fsdp_reshard_after_forward", True),
            "cpu_offload": getattr(cfg, "fsdp_cpu_offload", False),
            "bf16": getattr(cfg, "precision", "fp32") == "bf16"}


def init_from_env() -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1), or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local)


def device_for(d: Dist, requested: str | None) -> torch.device | None:
    """On GPUs each rank uses its own device; elsewhere the requested (or default) one."""
    if d.enabled and torch.cuda.is_available() and not requested:
        return torch.device("cuda", d.local_rank)
    return None
