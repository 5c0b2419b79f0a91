"""`directpo plan`: the memory a training run needs per device, on paper, from the model's config alone
(`--memory-budget`, measured on the loaded model, is `training.budget`).

The model is built on the meta device from its config.json (no weights read, nothing allocated),
so parameter counts are exact for any architecture; the rest is arithmetic on the settings. Per
device, in bytes (W = processes × nodes; P = all parameters, T = trainable ones: all, or the LoRA
adapters; H = the LM head's parameters, b = a block's):

    weights      4·P (fp32 master weights; bf16 only autocasts the matmuls)
                 --quantize (QLoRA; bitsandbytes' layouts, measured equal on the loaded model): each
                 linear layer but the LM head, n = in·out weights, holds nf4/fp4: n/2 (two 4-bit codes
                 a byte) + n/64 absmax bytes (blocks of 64; --no-double-quant: 4·n/64, fp32) + with
                 double quantization 4·⌈(n/64)/256⌉ (the absmaxes' own fp32 absmax per 256) + 1092
                 per tensor (the code tables, 16 + 256 fp32, and an fp32 offset; 64 without): about
                 0.516 byte per weight; int8 (LLM.int8): n + 4·out (an fp32 scale per row). The
                 rest (embeddings, norms, the LM head) stays 4 bytes per parameter, and the
                 adapters 4·T. One quantized weight at a time is dequantized for its matmul (forward
                 and backward: bitsandbytes keeps no dequantized copy): the largest, in the compute
                 dtype (2 bytes with bf16, else 4), is `dequantized_weight`; no bf16 weight copies
                 FSDP: 4·P/W, plus what is gathered at once: two blocks (the one computing, the
                 one prefetched) at 4 bytes per parameter (2 with --precision bf16), or the LM head
                 (gathered in fp32 even under bf16: its matmul stays fp32) and one block
    bf16 weight copies   --precision bf16 without FSDP: autocast's bf16 copy of each block's
                 weights, which the matmuls keep for the backward, 2 bytes per parameter (the
                 lean MLP's down projection casts its weight again in the backward and keeps none,
                 with or without LoRA). FSDP gathers bf16 weights: none.
    gradients    4·T (FSDP: the sharded part / W)
    optimizer    4·T × states: adamw 2, rmsprop 1, sgd 0 (FSDP: / W as the gradients);
                 adamw8bit, paged_adamw8bit (bitsandbytes): per trainable tensor of n values, 2·n
                 (two 8-bit moments) + 8·⌈n/256⌉ (an fp32 absmax per block of 256, each moment),
                 but 8·n (fp32 moments) for a tensor under 4096 values; + 2 KiB of code tables
                 (once, when any tensor is 8-bit)
    reference    precomputed (default): a table of 4 bytes per response, nothing during training;
                 --no-precompute-ref: a second frozen copy, 4·P (none with LoRA: the reference is
                 the same network with its adapters off)
    activations  per micro-batch of m pairs at max length L: tokens t = 2·m·L (chosen and rejected
                 rows, the padded layout's bound; the packed one shares the prompt), and per token
                 and layer (h hidden, q = heads·head_dim, k = 2·kv_heads·head_dim, i intermediate)
                     kept at 4 bytes: 2·h (the block's input and middle residual stream, which
                     the RMSNorms keep with one rsqrt per token: `directpo.fused.lean_norms`;
                     autograd op by op would also keep each norm's normalised input, 2·h more)
                     kept at 4 bytes, 2 with bf16: n·h + 3q + k + 2i (--quantize int8: 4i, see below), where n·h are the RMSNorms'
                     outputs (fp32: n = 2, one per norm, shared by the projections reading it;
                     bf16: n = 5, autocast casts it anew for each of q, k, v, gate and up, and each
                     matmul keeps its cast), 3q the rotated queries, the attention output as
                     attention keeps it and the contiguous copy o_proj keeps, k the keys and values
                     (bf16: + k/2, the two attention calls of a packed segment each cast the keys),
                     2i the MLP's gate and up (the lean SwiGLU of `directpo.fused` keeps those two;
                     it takes plain and 4-bit linear layers, dequantizing a 4-bit weight for the
                     forward's matmul and again in the backward; LLM.int8's it does not, so with
                     --quantize int8 the MLP runs op by op and keeps 4i: gate, silu(gate), up, and
                     their product for the down projection's adapter)
                 summed over the layers, plus 4·t·h (embeddings and final hidden state) and the LM
                 head's backward: one 32 MiB chunk of fp32 logits at a time (turned into their
                 gradient in place; the forward's last chunk stays alive until then, the
                 backward's first) and, when the head trains (not under LoRA), its gradient of
                 this micro-batch, 4·V·h, beside the accumulated one (the chunks' products are
                 accumulated inside the matmul, `addmm_`). With activation
                 checkpointing each layer keeps its input only, 4·t·h, and one layer at a time is
                 recomputed (with the full MLP, 4i). Attention keeps no (length × length) scores
                 (SDPA / flash attention). Measured against saved tensors and peak RSS on the CPU:
                 docs/results/bench/plan-vs-measured.md.

Vision-language models (issue #30; the vision tower and its projector frozen, as train's default
--freeze-vision: no gradients nor optimizer state for them, and the tower's forward keeps nothing for
the backward). An image of --image-size H×W becomes the processor's own count of image tokens
(`_get_num_multimodal_tokens`: Qwen2-VL's grid t·h·w / merge_size², LLaVA's (S/p)² of its crop, ...),
which are inside --max-length (counted by the activations as every token); and per micro-batch of m
pairs with n images each (the packed layout runs a pair's images once; --layout padded twice):
    pixels       the processor's tensors of the m·n images, 4 bytes a value: Qwen2-VL's patches of
                 channels·temporal·p² values, or a crop model's 3·S² per crop (crops per image: the
                 processor's count)
    vision tower its forward's transient peak over the m·n images' tower tokens (Qwen2-VL: its
                 patches; a crop model: (S/p)² per crop, + 1 with a class token), one block at a
                 time: tokens × (4·(4·d + 3·i) + 32), d its width, i its MLP's: the block's input and
                 output, its norm's output and the position embeddings (≤ d), and the MLP's hidden
                 layer with the activation made op by op (quick_gelu: x·sigmoid(1.702x), three of
                 size i at once), at 4 bytes; 32 bytes a token for its position ids (Qwen2-VL: (h, w)
                 pairs, int64) and the like. Attention's step is smaller for i ≥ 2d. Measured on the
                 tiny Qwen2-VL and LLaVA towers with `eval.budget.live_bytes`: 0.4 and 1.3 % above.
                 Counted beside the activations though freed before the language model's are made
                 (a bound).

A run fits when the sum is at most 90 % of the device's memory: the rest goes to the CUDA context,
the allocator's fragmentation and temporaries. On the CPU the allocator is the C heap:
glibc's default keeps freed temporaries between live activations; a 64 KiB mmap threshold gives them
back but made a `small` training step ~1.75× slower, so a CPU run fixes it only under
`--memory-budget`, where fitting is what was asked (`memory.bound_heap`). Measured at the bound
(docs/results/qlora-memory.md, "Plan against measured"): with the heap bounded a run held 0.83–1.07
of this plan; under glibc's default up to `CPU_DEFAULT_HEAP` times it, which the plan says beside its
total. `--fsdp-cpu-offload` moves the sharded weights,
gradients and optimizer state to host memory (listed, not counted against the device);
`--optimizer-offload` (one process) the optimizer state alone.

Setup is planned too: under FSDP every rank builds the model on the meta device, shards it, and
reads only its own rows of each tensor from the safetensors files, straight into its shards
(`Dist.shard_model` with `weights=`), so at setup a rank holds its shards: 4·P/W (+ its LoRA
adapters' share).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..config import ConfigError, check_micro_batch, check_ranges, setting
from ..memory import parse_size  # noqa: F401 (read here too: `plan.parse_size`)
from ..errors import UserValueError
from .lora import QUANTIZE
from .optim import BNB_OPTIMIZERS
from .plan_images import image_costs, image_hw, vision_shape

GiB = 1024 ** 3
# The most a CPU run under glibc's default heap held, as a multiple of this plan, measured at the bound
# (`base` fixture and a 0.5B-shaped model, 2026-12-06/07; docs/results/qlora-memory.md): said, not
# added, since with the heap bounded (--memory-budget) the plan holds and on a GPU it does not apply.
CPU_DEFAULT_HEAP = {"full": 1.17, "lora": 1.58, "qlora": 1.80}
HEAD_CHUNK_BYTES = 4 * (1 << 23)  # directpo.logprobs: _CHUNK_ELEMENTS fp32 logits per LM-head chunk
HEAD_BACKWARD_CHUNKS = 1  # chunks of logits alive at once in the head's backward (built in place)
USABLE = 0.9  # of the device's memory; the rest: CUDA context, fragmentation, temporaries
# fp32 states per trainable parameter; the 8-bit AdamWs' ≈ 2 bytes + an fp32 absmax per 256 (as a
# fraction of 4 bytes, for `training.budget`; `optimizer_bytes` counts them tensor by tensor)
OPTIMIZER_STATES = {"adamw": 2, "rmsprop": 1, "sgd": 0, "adamw8bit": (2 + 8 / 256) / 4,
                    "paged_adamw8bit": (2 + 8 / 256) / 4}
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 moments
QUANT_BLOCK, STATE_BLOCK = 64, 256  # weights per 4-bit absmax; optimizer-state values per 8-bit absmax


@dataclass
class PlanConfig:
    """The run to plan"""

    model: str = setting(None, "model: a Hugging Face model id or local directory (its config.json only is read)",
                         required=True)
    nproc: int = setting(1, "processes (devices) per node", ge=1)
    nnodes: int = setting(1, "nodes", ge=1)
    batch_size: int = setting(64, "examples (preference pairs) per optimizer step, over all devices", ge=1)
    micro_batch_size: int = setting(8, "pairs per forward/backward on one device", ge=1)
    max_length: int = setting(512, "max tokens of prompt + response", ge=2)
    precision: str = setting("fp32", "fp32, or bf16 (autocast; fp32 master weights)", choices=["fp32", "bf16"])
    optimizer: str = setting("rmsprop", "optimizer (its state per trainable parameter: adamw 2, rmsprop 1, sgd 0 "
                                        "fp32 values; adamw8bit and paged_adamw8bit ~2 bytes)",
                             choices=list(OPTIMIZER_STATES))
    fsdp: bool = setting(False, "shard weights, gradients and optimizer state over the devices (FSDP2)")
    fsdp_cpu_offload: bool = setting(False, "with --fsdp: the shards, gradients and optimizer state in host memory")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward")
    optimizer_offload: bool = setting(False, "the optimizer state in host memory, stepped there (one process; "
                                             "with --fsdp: --fsdp-cpu-offload)")
    lora_r: int = setting(0, "LoRA rank, adapters on every linear layer of the blocks (0: full fine-tuning)", ge=0)
    precompute_ref: bool = setting(True, "reference log-probs precomputed (no reference model during training)")
    quantize: str = setting("none", "the base's linear layers quantized by bitsandbytes (QLoRA, with --lora-r): "
                                    "nf4 or fp4 (~0.52 byte per weight), int8 (~1 byte)", choices=list(QUANTIZE))
    double_quant: bool = setting(True, "with --quantize nf4/fp4: the 4-bit blocks' scales quantized too")
    image_size: str | None = setting(None, "vision-language models: each image's size in pixels, HxW (default: the "
                                           "processor's: its crop or fixed size, or the largest it keeps)",
                                     metavar="HxW")
    images: int = setting(1, "vision-language models: images per pair (in its prompt)", ge=0)
    memory_per_device: float = setting(80.0, "memory of one device, GiB", gt=0)
    trust_remote_code: bool = setting(False, "allow the model repo's own Python code (to read its config)")
    json: bool = setting(False, "print the plan as JSON")

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    def validate(self) -> "PlanConfig":
        from ..config import check_required

        check_required(self)
        check_ranges(self)
        check_micro_batch(self.batch_size, self.micro_batch_size)
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ConfigError("--fsdp-cpu-offload shapes FSDP sharding: it needs --fsdp")
        if self.optimizer_offload and self.fsdp:
            raise ConfigError("--optimizer-offload is for one process's optimizer; with --fsdp use --fsdp-cpu-offload")
        why = ("quantized weights do not train: add --lora-r" if self.quantize != "none" and not self.lora_r else
               "it does not combine with --fsdp" if self.quantize != "none" and self.fsdp else None)
        if why:
            raise ConfigError(f"--quantize {self.quantize}: {why}")
        if not self.double_quant and self.quantize not in ("nf4", "fp4"):
            raise ConfigError("--no-double-quant: only --quantize nf4 or fp4 reads it")
        if self.image_size is not None:
            image_hw(self.image_size)
        if self.optimizer in BNB_OPTIMIZERS and self.fsdp:
            raise ConfigError(f"--optimizer {self.optimizer}: bitsandbytes steps plain tensors, not FSDP's shards")
        return self


@dataclass
class Shape:
    """What the plan needs of a model, counted on its meta-device build."""

    params: int  # all parameters (tied ones once)
    head: int  # the LM head's (0 when tied to the input embedding)
    block: int  # the largest transformer block's
    layers: int
    hidden: int
    q_dim: int  # heads × head_dim
    kv_dim: int  # 2 × kv_heads × head_dim (k and v)
    intermediate: int
    lora_per_rank: int  # LoRA parameters per unit of rank, adapters on every linear of the blocks
    tied: bool
    vocab: int = 0  # rows of the LM head (tied or not)
    # every linear layer but the LM head (what --quantize quantizes), as [in, out, how many]
    linears: list = field(default_factory=list)
    small_params: int = 0  # parameters in tensors under MIN_8BIT_SIZE values (fp32 moments in 8-bit AdamW)
    state_blocks: int = 0  # Σ ⌈n/256⌉ over the other tensors: 8-bit AdamW's absmaxes per moment
    # a vision-language model's vision side and what one image costs (`vision_shape`, `image_costs`); None: text
    vision: dict | None = None


def model_shape(name_or_dir: str, trust_remote_code: bool = False, image_size: str | None | bool = None) -> Shape:
    """`Shape` of a model from its config.json: built on the meta device, nothing allocated; a
    vision-language model's with what an image of `image_size` costs, read off its processor (False:
    its vision side alone, no processor read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models import load_config, remote_code_error, unwrap_peft
    from .adapters import adapter_numel, read_adapter_dir

    adapter = read_adapter_dir(name_or_dir)  # an adapter directory: its base's shape plus its adapter's weights
    if adapter is not None:  # (adapters below it in a chain are merged into the base: no weights of their own)
        s = model_shape(adapter.root, trust_remote_code, False)
        if s.vision is not None and image_size is not False:  # (the adapter folder carries the processor)
            s.vision.update(image_costs(name_or_dir, s.vision, image_size, trust_remote_code))
        return replace(s, params=s.params + adapter_numel(adapter.path))
    config = load_config(name_or_dir, trust_remote_code)  # (a folder with no config.json, a hub id offline: one line)
    try:
        auto = AutoModelForCausalLM
        if getattr(config, "vision_config", None) is not None:  # a vision-language model (`shape_of`)
            from transformers import AutoModelForImageTextToText as auto
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:  # its own code, refused: one line naming --trust-remote-code and the code
        explained = remote_code_error(name_or_dir, e)
        if explained is None:
            raise
        raise explained from None
    s = shape_of(unwrap_peft(model))
    if s.vision is not None and image_size is not False:  # (False: the tower alone, no processor read)
        s.vision.update(image_costs(name_or_dir, s.vision, image_size, trust_remote_code))
    return s


def shape_of(model) -> Shape:
    """`Shape` of a (meta or real) causal LM. A vision-language model's blocks are its language
    model's; its vision side (`vision_shape`: every weight counted, the tower's transient forward
    and the pixels by `image_bytes`) is `Shape.vision`."""
    import torch

    from ..models import attention_widths

    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    blocks_named = set(getattr(model, "_no_split_modules", None) or [])
    within = model
    if getattr(model.config, "vision_config", None) is not None:
        from ..vision import language_model

        within = language_model(model)
    blocks = [m for m in within.modules() if type(m).__name__ in blocks_named]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    hidden = text.hidden_size
    heads, kv_heads, head_dim = attention_widths(model.config)
    lora = sum(m.in_features + m.out_features for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    linears: dict = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            linears[(m.in_features, m.out_features)] = linears.get((m.in_features, m.out_features), 0) + 1
    sizes = [p.numel() for p in model.parameters()]
    return Shape(params=sum(sizes), linears=[[i, o, c] for (i, o), c in linears.items()],
                 small_params=sum(n for n in sizes if n < MIN_8BIT_SIZE),
                 state_blocks=sum(-(-n // STATE_BLOCK) for n in sizes if n >= MIN_8BIT_SIZE),
                 head=0 if tied or head is None else head.weight.numel(),
                 block=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
                 layers=len(blocks) or text.num_hidden_layers, hidden=hidden, q_dim=heads * head_dim,
                 kv_dim=2 * kv_heads * head_dim, intermediate=getattr(text, "intermediate_size", 4 * hidden),
                 lora_per_rank=lora, tied=tied, vocab=head.weight.shape[0] if head is not None else 0,
                 vision=vision_shape(model) if within is not model else None)


def head_bytes(s: Shape, cfg: PlanConfig) -> int:
    """The LM head's part of a micro-batch's activations: its backward's chunk of logits, and its
    gradient of this micro-batch when it trains (see the module docstring)."""
    return HEAD_BACKWARD_CHUNKS * HEAD_CHUNK_BYTES + (0 if cfg.lora_r else 4 * s.vocab * s.hidden)


def quantized_linears(s: Shape, cfg: PlanConfig) -> tuple[int, int]:
    """(bytes, parameters) of the linear layers `--quantize` quantizes (all but the LM head), as
    bitsandbytes holds them (module docstring); (0, 0) without --quantize."""
    total = count = 0
    for i, o, c in ([] if cfg.quantize == "none" else s.linears):
        n = i * o
        if cfg.quantize == "int8":
            held = n + 4 * o
        else:
            blocks = -(-n // QUANT_BLOCK)
            held = -(-n // 2) + (blocks + 4 * -(-blocks // STATE_BLOCK) + 1092 if cfg.double_quant else 4 * blocks + 64)
        total, count = total + c * held, count + c * n
    return total, count


def optimizer_bytes(s: Shape, cfg: PlanConfig, trainable: float) -> float:
    """The optimizer's state (module docstring): fp32 states × `trainable`, or bitsandbytes' 8-bit
    AdamW counted tensor by tensor (the full model's, or each adapter's: r × in and out × r)."""
    if cfg.optimizer not in BNB_OPTIMIZERS:
        return 4 * trainable * OPTIMIZER_STATES[cfg.optimizer]
    tables = 2 * 256 * 4  # the two moments' quantization maps, shared by every 8-bit tensor
    if not cfg.lora_r:
        quantized = s.params - s.small_params
        return 8 * s.small_params + 2 * quantized + 8 * s.state_blocks + (tables if quantized else 0)

    def state(n: int) -> int:
        return 8 * n if n < MIN_8BIT_SIZE else 2 * n + 8 * -(-n // STATE_BLOCK)

    sizes = [cfg.lora_r * d for i, o, c in s.linears for d in (i, o) for _ in range(c)]
    return sum(state(n) for n in sizes) + (tables if max(sizes, default=0) >= MIN_8BIT_SIZE else 0)


def activation_bytes(s: Shape, cfg: PlanConfig, micro_batch: int) -> int:
    """Activations kept for the backward of one micro-batch (see the module docstring)."""
    t = 2 * micro_batch * cfg.max_length
    bf16 = cfg.precision == "bf16"
    low = 2 if bf16 else 4
    residual = 4 * t * s.hidden
    norms = (5 if bf16 else 2) * s.hidden  # the RMSNorms' outputs as the projections keep them
    if cfg.activation_checkpointing:  # (the recomputed layer attends through one dense-mask call)
        full_layer = 4 * residual + low * t * (norms + 3 * s.q_dim + s.kv_dim + 4 * s.intermediate)
        layers = s.layers * residual + full_layer
    else:
        keys = s.kv_dim + (s.kv_dim // 2 if bf16 else 0)  # bf16: the keys (half of kv) cast once more
        mlp = (4 if cfg.quantize == "int8" else 2) * s.intermediate  # (int8: no lean SwiGLU)
        layers = s.layers * (2 * residual + low * t * (norms + 3 * s.q_dim + keys + mlp))
    return layers + 2 * residual + head_bytes(s, cfg)


def image_bytes(s: Shape, cfg: PlanConfig, micro_batch: int) -> dict:
    """A vision-language micro-batch's images (module docstring): their pixel tensors and the
    tower's transient peak over them; {} for a text model (or one planned without its processor)."""
    v = s.vision or {}
    if "image_tokens" not in v:
        return {}
    images = micro_batch * cfg.images
    return {"pixels": images * v["pixel_bytes"],
            "vision_tower": images * v["tower_tokens"] * (4 * (4 * v["hidden"] + 3 * v["intermediate"]) + 32)}


def bf16_weight_copies(s: Shape, cfg: PlanConfig) -> int:
    """Autocast's bf16 copies of the blocks' weights kept for the backward (module docstring)."""
    if cfg.precision != "bf16" or cfg.fsdp or cfg.quantize != "none":  # (quantized: `dequantized_weight`)
        return 0
    return 2 * s.layers * (s.block - s.hidden * s.intermediate)


def gathered_bytes(s: Shape, cfg: PlanConfig) -> int:
    """FSDP: the most gathered (unsharded) weights alive at once: two blocks (the one computing and
    the one prefetched), or the LM head (fp32) and one block (module docstring); 0 without FSDP."""
    if not cfg.fsdp:
        return 0
    block = s.block * (2 if cfg.precision == "bf16" else 4)
    return max(2 * block, 4 * s.head + block)


def memory_plan(s: Shape, cfg: PlanConfig) -> dict:
    """Bytes per device of each part, the total, and whether it fits `cfg.memory_per_device`."""
    if cfg.fsdp and s.tied:
        raise UserValueError("--fsdp with tied input/output embeddings is not supported by directpo (the LM head would "
                             "be sharded with the embedding): plan without --fsdp")
    w = cfg.world if cfg.fsdp else 1
    # (a vision-language model's tower and projector are frozen: --freeze-vision, train's default)
    trainable = cfg.lora_r * s.lora_per_rank if cfg.lora_r else s.params - (s.vision or {}).get("params", 0)
    per_trainable = trainable / w  # FSDP shards every parameter, the LM head's too
    quantized, quantized_params = quantized_linears(s, cfg)
    weights = 4 * (s.params - quantized_params) / w + quantized
    if cfg.lora_r:
        weights += 4 * per_trainable
    parts = {
        "weights": weights,
        "bf16_weight_copies": bf16_weight_copies(s, cfg),
        "gradients": 4 * per_trainable,
        "optimizer": optimizer_bytes(s, cfg, per_trainable),
        "fsdp_gathered_blocks": gathered_bytes(s, cfg),
        "reference_model": 0 if cfg.precompute_ref or cfg.lora_r else 4 * s.params,
        "activations": activation_bytes(s, cfg, cfg.micro_batch_size),
        **image_bytes(s, cfg, cfg.micro_batch_size),
    }
    if quantized:  # the largest quantized weight, dequantized for its matmul (compute dtype)
        parts["dequantized_weight"] = max(i * o for i, o, _ in s.linears) * (2 if cfg.precision == "bf16" else 4)
    host = {}
    if cfg.fsdp_cpu_offload:  # the shards leave the device, all of them
        for k in ("weights", "gradients", "optimizer"):
            host[k], parts[k] = parts[k], 0
    if cfg.optimizer_offload:  # (an fp32 master copy too where weights are not fp32: never here, they are)
        host["optimizer"], parts["optimizer"] = parts["optimizer"], 0
    total = sum(parts.values())
    budget = cfg.memory_per_device * GiB * USABLE
    # FSDP: a rank reads its own rows of each tensor straight into its shards (`_fill_shards`)
    setup = weights if cfg.fsdp else total
    return {"parts": {k: int(v) for k, v in parts.items()}, "host": {k: int(v) for k, v in host.items()},
            "total": int(total), "budget": int(budget), "setup_rank0": int(setup),
            "fits": total <= budget and setup <= budget, "largest_micro_batch": largest_micro_batch(s, cfg, parts,
                                                                                                  budget)}


def largest_micro_batch(s: Shape, cfg: PlanConfig, parts: dict, budget: float) -> int:
    """The largest micro-batch (a divisor of the batch, at most one device's share of it) whose
    activations fit beside everything else; 0 when not even one pair does."""
    per_batch = ("activations", *image_bytes(s, cfg, 1))  # (the parts that grow with the micro-batch)
    fixed = sum(v for k, v in parts.items() if k not in per_batch)
    share = max(1, cfg.batch_size // cfg.world)
    fitting = [m for m in range(1, share + 1) if cfg.batch_size % m == 0
               and fixed + activation_bytes(s, cfg, m) + sum(image_bytes(s, cfg, m).values()) <= budget]
    return max(fitting, default=0)


def suggest(s: Shape, cfg: PlanConfig) -> tuple[PlanConfig, dict] | None:
    """The least intrusive change that makes the run fit, tried in order and accumulated: a smaller
    micro-batch, activation checkpointing, the optimizer state in host memory (one device), FSDP
    (several devices), LoRA (r = 16). None: nothing
    of that fits (more devices are needed)."""
    from dataclasses import replace

    steps = [{}, {"activation_checkpointing": True}]
    if cfg.world == 1 and not cfg.optimizer_offload:  # (several devices: FSDP shards the state instead)
        steps.append({"optimizer_offload": True})
    if cfg.world > 1 and not s.tied:
        steps.append({"fsdp": True})
    steps.append({"lora_r": cfg.lora_r or 16})
    if cfg.quantize == "none":  # QLoRA last: a 4-bit base, one whole copy per device (no FSDP)
        steps.append({"quantize": "nf4", "fsdp": False, "fsdp_cpu_offload": False})
    changes: dict = {}
    for step in steps:
        changes.update(step)
        trial = replace(cfg, **changes)
        plan = memory_plan(s, trial)
        if plan["fits"]:
            return trial, plan
        if plan["largest_micro_batch"]:
            trial = replace(trial, micro_batch_size=plan["largest_micro_batch"])
            plan = memory_plan(s, trial)
            if plan["fits"]:
                return trial, plan
    return None


def plan(cfg: PlanConfig, shape: Shape | None = None) -> dict:
    """The whole answer of `directpo plan`: the model's counts, the plan, and a fix when it does not fit."""
    cfg.validate()
    # (--images 0: a VLM planned without pictures, its processor not read)
    s = shape or model_shape(cfg.model, cfg.trust_remote_code, cfg.image_size if cfg.images else False)
    result = {"model": cfg.model, "shape": asdict(s), "settings": asdict(cfg), "plan": memory_plan(s, cfg)}
    result["cpu_default_heap_factor"] = cpu_heap_factor(result["settings"])
    if s.vision is not None and "image_tokens" in s.vision:  # what an image becomes, within --max-length
        text = cfg.max_length - cfg.images * s.vision["image_tokens"]
        result["images"] = {k: s.vision[k] for k in ("image_size", "image_tokens", "tower_tokens", "pixel_bytes")}
        result["images"].update(per_pair=cfg.images, text_tokens_left=text)
    if not result["plan"]["fits"]:
        fix = suggest(s, cfg)
        if fix is not None:
            changed = {k: v for k, v in asdict(fix[0]).items() if asdict(cfg)[k] != v}
            result["suggestion"] = {"change": changed, "plan": fix[1]}
        else:
            result["suggestion"] = None
    return result


def cpu_heap_factor(cfg: dict) -> float:
    """`CPU_DEFAULT_HEAP` for the run's mode (full fine-tuning, LoRA, QLoRA)."""
    quantized = cfg.get("quantize", "none") != "none"
    return CPU_DEFAULT_HEAP["qlora" if quantized else "lora" if cfg["lora_r"] else "full"]
