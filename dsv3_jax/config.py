"""Model configuration: one frozen dataclass, validated when built, with presets and HF `config.json` I/O.

Field names follow the Hugging Face DeepSeek-V3 `config.json` wherever one exists, so a released config maps
onto this one field by field. Fields HF does not have (compute dtype, MoE dispatch, remat) come last.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from .errors import InputError, MissingInputError

MOE_IMPLS = ("auto", "dense", "ragged", "blocked", "gathered", "expert_parallel")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload_inputs", "paper", "paper_offload")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("plain", "blocked")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (arXiv 2412.19437 §4.3; docs/architecture.md §3). `mscale_all_dim` enters the softmax scale; the ratio
    `mscale/mscale_all_dim` (1 for V3) scales cos/sin, as in HF transformers."""
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    type: str = "yarn"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048       # width of one routed (and each shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    first_k_dense_replace: int = 3
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    q_lora_rank: Optional[int] = 1536       # None: queries come from one full-rank projection (V2-Lite style)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = RopeScaling()
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1       # MTP depth D
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    # --- not in HF's config ---
    dtype: str = "float32"                  # compute dtype of matmuls; params stay param_dtype
    param_dtype: str = "float32"
    moe_impl: str = "auto"                  # routed-expert dispatch; what "auto" picks: model/dispatch.py
    moe_block_size: int = 0                 # rows per block of the blocked kernel; 0: 64 when E >= 256, else 128
    # Expert-parallel exchange: candidate capacities per destination, as fractions of the dropless worst
    # case (always added); the smallest that holds the busiest destination runs (model/expert_parallel.py).
    # (1.0,) keeps one branch: less compile time, but the traffic no longer follows the routing.
    moe_capacity_fractions: tuple = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0)
    remat_policy: str = "none"
    # Layer stacks always keep one stacked parameter tree (same checkpoints either way); `scan_unroll`
    # layers run per loop iteration. 1 = a rolled loop (compile time independent of depth, the choice for
    # deep models); >= the stack's depth = straight-line code, which saves the loop's per-layer slicing
    # and stacked residual buffers (the measurement: experiments/results/config_choices.md).
    scan_unroll: int = 1
    # Training attention core: "plain" holds [B,H,T,S] fp32 scores; "blocked" is the online-softmax form of
    # model/attention.py (attention_block x attention_block score blocks), for long sequences on big meshes.
    attention_impl: str = "plain"
    attention_block: int = 512
    # Expert-parallel receiver: one rematerialised kernel pass per slot, [rows, D] buffers instead of
    # [rows * slots, D] (model/expert_parallel.py, _slot_passes); the per-layer working set of big models.
    moe_slot_passes: bool = False
    # Plain core, causal by index (default positions, no key mask): query rows per block, each block against
    # only the keys up to its end, so the masked blocks above the diagonal are never computed; 0: one block.
    attention_causal_block: int = 128

    def __post_init__(self):
        if isinstance(self.moe_capacity_fractions, list):          # from JSON
            object.__setattr__(self, "moe_capacity_fractions", tuple(self.moe_capacity_fractions))
        validate(self)

    # Derived sizes ---------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """`qk_head_dim^-0.5`, times `mscale^2` under YaRN (docs/architecture.md §2-3)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        rs = d.get("rope_scaling")
        if isinstance(rs, dict):
            d["rope_scaling"] = RopeScaling(**rs)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        return cls(**d)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _fail(field: str, problem: str, fix: str):
    raise InputError(f"ModelConfig.{field}: {problem}; {fix}")


def validate(c: ModelConfig) -> None:
    """Every impossible combination raises an InputError naming the field and the fix."""
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
        v = getattr(c, name)
        if not isinstance(v, int) or v <= 0:
            _fail(name, f"must be a positive integer, got {v!r}", "set it to a value >= 1")
    if c.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", f"{c.qk_rope_head_dim} is odd but RoPE rotates pairs", "use an even value")
    if c.q_lora_rank is not None and c.q_lora_rank <= 0:
        _fail("q_lora_rank", f"must be positive or None, got {c.q_lora_rank}", "use None for a full-rank query")
    if not 0 <= c.first_k_dense_replace <= c.num_hidden_layers:
        _fail("first_k_dense_replace", f"{c.first_k_dense_replace} is outside [0, num_hidden_layers="
              f"{c.num_hidden_layers}]", "use a value between 0 and num_hidden_layers")
    if c.first_k_dense_replace > 0 and c.intermediate_size <= 0:
        _fail("intermediate_size", "dense layers need a positive FFN width", "set intermediate_size >= 1")
    if c.num_nextn_predict_layers < 0:
        _fail("num_nextn_predict_layers", "must be >= 0", "use 0 to turn MTP off")
    needs_moe = c.num_moe_layers > 0 or c.num_nextn_predict_layers > 0
    if needs_moe:
        if c.n_routed_experts <= 0 or c.moe_intermediate_size <= 0:
            _fail("n_routed_experts", "MoE layers (or MTP blocks, which are MoE layers) need routed experts "
                  "and a positive moe_intermediate_size", "set both >= 1, or make every layer dense and MTP 0")
        if c.n_shared_experts < 0:
            _fail("n_shared_experts", "must be >= 0", "use 0 for no shared expert")
        if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
            _fail("num_experts_per_tok", f"{c.num_experts_per_tok} is outside [1, n_routed_experts="
                  f"{c.n_routed_experts}]", "pick at most n_routed_experts experts per token")
        if c.n_group < 1 or c.n_routed_experts % c.n_group:
            _fail("n_group", f"n_routed_experts={c.n_routed_experts} is not divisible by n_group={c.n_group}",
                  "choose n_group dividing n_routed_experts")
        if not 1 <= c.topk_group <= c.n_group:
            _fail("topk_group", f"{c.topk_group} is outside [1, n_group={c.n_group}]",
                  "keep at most n_group groups")
        per_group = c.n_routed_experts // c.n_group
        if c.n_group > 1 and per_group < 2:
            _fail("n_group", f"groups of {per_group} expert(s): a group's score sums its top-2 experts",
                  "use n_group <= n_routed_experts / 2")
        if c.num_experts_per_tok > c.topk_group * per_group:
            _fail("num_experts_per_tok", f"{c.num_experts_per_tok} experts cannot be reached inside "
                  f"topk_group={c.topk_group} groups of {per_group}", "raise topk_group or lower num_experts_per_tok")
        if c.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", "must be > 0", "use 2.5 as in V3")
    rs = c.rope_scaling
    if rs is not None:
        if rs.type not in ("yarn",):
            _fail("rope_scaling.type", f"{rs.type!r} is not supported", "use 'yarn' or rope_scaling=None")
        if rs.factor <= 0 or rs.original_max_position_embeddings <= 0:
            _fail("rope_scaling", "factor and original_max_position_embeddings must be > 0", "fix the values")
    if c.rope_theta <= 0:
        _fail("rope_theta", "must be > 0", "use 10000")
    for name in ("dtype", "param_dtype"):
        if getattr(c, name) not in DTYPES:
            _fail(name, f"{getattr(c, name)!r} is not one of {DTYPES}", "pick one of those")
    if c.moe_impl not in MOE_IMPLS:
        _fail("moe_impl", f"{c.moe_impl!r} is not one of {MOE_IMPLS}", "pick one of those")
    if not isinstance(c.moe_block_size, int) or c.moe_block_size < 0:
        _fail("moe_block_size", f"must be an integer >= 0, got {c.moe_block_size!r}",
              "use 0 (auto: 64 when n_routed_experts >= 256, else 128) or a row count")
    fr = c.moe_capacity_fractions
    if not isinstance(fr, tuple) or not fr or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in fr):
        _fail("moe_capacity_fractions", f"must be a non-empty list of numbers in (0, 1], got {fr!r}",
              "use e.g. [0.25, 0.5, 1.0], or [1.0] for one worst-case buffer")
    if c.scan_unroll < 1:
        _fail("scan_unroll", "must be >= 1", "use 1 (a rolled loop) or the number of layers (unrolled)")
    if c.remat_policy not in REMAT_POLICIES:
        _fail("remat_policy", f"{c.remat_policy!r} is not one of {REMAT_POLICIES}", "pick one of those")
    if c.attention_impl not in ATTENTION_IMPLS:
        _fail("attention_impl", f"{c.attention_impl!r} is not one of {ATTENTION_IMPLS}", "pick one of those")
    if c.attention_block < 1:
        _fail("attention_block", "must be >= 1", "use 512")
    if c.attention_causal_block < 0:
        _fail("attention_causal_block", "must be >= 0", "use 128, or 0 for one block")
    if c.tie_word_embeddings:
        _fail("tie_word_embeddings", "DeepSeek-V3 unties the head from the embedding", "set it to False")


# Presets ----------------------------------------------------------------------------------------------

PRESETS: dict[str, ModelConfig] = {
    "v3-671b": ModelConfig(),
    # Trains usefully on a 2-core CPU in minutes (byte vocabulary).
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, first_k_dense_replace=1,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_scaling=None, max_position_embeddings=1024, num_nextn_predict_layers=1, scan_unroll=4,
    ),
    # About 258M total / 52M active parameters (44M without the embedding).
    "small": ModelConfig(
        vocab_size=16384, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=10, num_attention_heads=8, first_k_dense_replace=1,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        rope_scaling=None, max_position_embeddings=4096, num_nextn_predict_layers=1,
    ),
    # The shared benchmark config of experiments/bench_train.py, without the batch.
    "bench": ModelConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, first_k_dense_replace=1,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_scaling=None, max_position_embeddings=512, num_nextn_predict_layers=1, scan_unroll=4,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# HF config.json ---------------------------------------------------------------------------------------

_HF_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)
              if f.name not in ("dtype", "param_dtype", "moe_impl", "moe_block_size", "moe_capacity_fractions",
                                "remat_policy", "scan_unroll", "attention_impl", "attention_block",
                                 "attention_causal_block", "rope_scaling", "moe_slot_passes")]


# config.json keys that carry no model math (file metadata, generation defaults, parallelism hints, the
# training recipe's aux-loss settings, derived sizes) or that the checkpoint loader reads itself
# (quantization_config): accepted without a word. Any other key we do not model gets a warning naming it.
_HF_IGNORED = {"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
               "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "pretraining_tp", "ep_size",
               "aux_loss_alpha", "seq_aux", "output_router_logits", "quantization_config", "head_dim",
               "_name_or_path", "return_dict", "output_hidden_states", "output_attentions", "tie_word_embeddings",
               "num_mtp_layers", "rope_scaling", "rope_parameters", "rope_theta"}
# Keys whose value decides the math: {key: (the one value we implement, why)}. Anything else is an InputError.
_HF_FIXED = {
    "scoring_func": ("sigmoid", "V3 gates with sigmoid affinities (paper section 2.1.2); V2's softmax is not implemented"),
    "topk_method": ("noaux_tc", "V3 routes by bias-adjusted top-k within the best groups (paper section 2.1.2)"),
    "hidden_act": ("silu", "the experts and dense MLPs are SwiGLU"),
    "moe_layer_freq": (1, "every layer after first_k_dense_replace is MoE"),
    "attention_bias": (False, "MLA's projections have no bias"),
    "rope_interleave": (True, "RoPE rotates interleaved pairs, as DeepSeek's weights are laid out"),
    "attention_dropout": (0.0, "no dropout is implemented"),
}


def from_hf_dict(hf: dict, **overrides) -> ModelConfig:
    """Map an HF DeepSeek-V3 config (the released `config.json` of V3/R1/V3.1, Moonlight, Kimi-K2, or what
    transformers 5.x writes) onto ours.

    Reads the rope block from `rope_scaling` (released) or `rope_parameters` (transformers 5.x). An absent
    `num_nextn_predict_layers` means no MTP module (Moonlight). A key we do not model gets a warning naming
    it; a value we cannot honour (`scoring_func: softmax`, say) an InputError naming key and value."""
    import warnings
    if hf.get("model_type", "deepseek_v3") not in ("deepseek_v3", "kimi_k2"):
        raise InputError(f"config.json is for model_type={hf.get('model_type')!r}, not deepseek_v3 (or kimi_k2)")
    for key, (want, why) in _HF_FIXED.items():
        if key in hf and hf[key] is not None and hf[key] != want:
            raise InputError(f"config.json {key}={hf[key]!r} is not supported: only {want!r} ({why})")
    heads = hf.get("num_attention_heads", ModelConfig.num_attention_heads)
    if hf.get("num_key_value_heads") not in (None, heads):
        raise InputError(f"config.json num_key_value_heads={hf['num_key_value_heads']} differs from "
                         f"num_attention_heads={heads}: MLA has one key/value head per query head")
    qk = hf.get("qk_nope_head_dim", ModelConfig.qk_nope_head_dim) + hf.get("qk_rope_head_dim",
                                                                            ModelConfig.qk_rope_head_dim)
    if hf.get("qk_head_dim") not in (None, qk):
        raise InputError(f"config.json qk_head_dim={hf['qk_head_dim']} is not qk_nope_head_dim + qk_rope_head_dim = {qk}")
    unknown = sorted(set(hf) - set(_HF_FIELDS) - _HF_IGNORED - set(_HF_FIXED) - {"num_key_value_heads", "qk_head_dim"})
    if unknown:
        warnings.warn(f"config.json field(s) {', '.join(unknown)} are not modelled by dsv3_jax and are ignored",
                      stacklevel=2)
    kw: dict[str, Any] = {k: hf[k] for k in _HF_FIELDS if k in hf and hf[k] is not None}
    if "q_lora_rank" in hf and hf["q_lora_rank"] is None:
        kw["q_lora_rank"] = None                # full-rank queries (V2-Lite, Moonlight): null is meaningful here
    if "num_nextn_predict_layers" not in hf:
        kw["num_nextn_predict_layers"] = int(hf.get("num_mtp_layers") or 0)
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if "rope_theta" in rope:
        kw["rope_theta"] = rope["rope_theta"]
    kind = rope.get("type", rope.get("rope_type", "default"))
    if kind == "yarn":
        kw["rope_scaling"] = RopeScaling(
            factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0))
    elif kind == "default":
        kw["rope_scaling"] = None
    else:
        raise InputError(f"config.json rope type {kind!r} is not supported (use yarn or default)")
    for key in ("n_group", "topk_group"):
        kw.setdefault(key, 1)
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except InputError:
        raise
    except ValueError as e:                     # validate() names the field; it came from config.json
        raise InputError(f"config.json: {e}") from None


def to_hf_dict(c: ModelConfig) -> dict:
    """The HF `config.json` for this model (loadable by transformers' DeepseekV3Config)."""
    d: dict[str, Any] = {k: getattr(c, k) for k in _HF_FIELDS}
    d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
             num_key_value_heads=c.num_attention_heads, scoring_func="sigmoid", topk_method="noaux_tc",
             moe_layer_freq=1, attention_bias=False, rope_interleave=True,
             torch_dtype="float32" if c.param_dtype == "float32" else "bfloat16")
    if c.rope_scaling is None:
        d["rope_scaling"] = None
    else:
        rs = c.rope_scaling
        d["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": rs.factor,
                             "original_max_position_embeddings": rs.original_max_position_embeddings,
                             "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
                             "mscale": rs.mscale, "mscale_all_dim": rs.mscale_all_dim}
    return d


def config_json_kind(raw) -> Optional[str]:
    """config_kind of an already parsed config.json."""
    if isinstance(raw, dict) and "model_type" in raw:
        return "hf"
    if isinstance(raw, dict) and {"model", "train"} <= raw.keys():
        return "run"
    return None


def config_kind(directory: str) -> Optional[str]:
    """What `directory/config.json` belongs to: "run" (a dsv3_jax run: model and train sections), "hf" (a
    Hugging Face checkpoint: model_type), or None (absent, unreadable, or neither). The CLI uses it to say
    which option a directory given to the wrong one belongs to."""
    try:
        with open(os.path.join(directory, "config.json")) as fh:
            return config_json_kind(json.load(fh))
    except (OSError, ValueError):
        return None


def read_hf_config_json(path: str) -> dict:
    """The raw `config.json` of a checkpoint directory (or that file itself)."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise MissingInputError(f"no config.json at {f}")
    with open(f) as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as e:
            raise InputError(f"{f} is not valid JSON: {e}") from None
    if config_json_kind(raw) == "run":
        raise InputError(f"{f} is a dsv3_jax training run's config, not a Hugging Face checkpoint's: pass the "
                         "run as --run-dir (generate, convert) or continue it with --resume (train)")
    return raw


def load_hf_config(path: str, **overrides) -> ModelConfig:
    """Read `config.json` from a file or a checkpoint directory."""
    return from_hf_dict(read_hf_config_json(path), **overrides)


def save_hf_config(path: str, c: ModelConfig) -> None:
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(to_hf_dict(c), fh, indent=2)


# Training and mesh ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1       # -1 takes every device the other axes leave
    expert: int = 1
    tensor: int = 1
    zero3: bool = False  # also shard parameters' `embed` axis over `data` (ZeRO-3 style)
    fsdp: bool = False   # with zero3: shard `embed` over data AND expert where the expert axis is free (every
                         # non-expert parameter, which the expert axis otherwise replicates): FSDP over all axes
    staged_gather: bool = True  # with fsdp: gather a weight where it is read over part of the mesh, then the
                                # rest (sharding.logical_rules says why); false: in one collective


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The V3 pre-training recipe (arXiv 2412.19437 §4.2; docs/architecture.md §8), scaled by the step
    counts given here."""
    seed: int = 0
    steps: int = 1000
    global_batch_size: int = 16
    seq_len: int = 256
    microbatches: int = 1                 # gradient accumulation: the batch is split into this many
    learning_rate: float = 2.2e-4         # peak
    warmup_steps: int = 2000
    stable_steps: int = 0                 # constant at the peak after warm-up
    decay_steps: int = 0                  # cosine from the peak to final_lr
    final_lr: float = 2.2e-5
    lr_tail: tuple = ()                   # ((step, lr), ...): constants after the cosine, e.g. V3's 7.3e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch_step: int = -1      # -1: never switch
    balance_alpha: float = 1e-4           # weight of the balance loss (0: none)
    balance_loss: str = "sequence"        # 'sequence' (V3's complementary loss) or 'batch' (conventional aux loss)
    bias_update_rate: float = 1e-3        # gamma (0 with balance_alpha 0: no balancing at all)
    bias_update_rule: str = "sign"        # 'sign' (V3) or 'proportional' (Loss-Free Balancing's variant)
    bias_update_rate_final: float = -1.0  # gamma follows the lr's cosine down to this (-1: constant gamma)
    bias_update_stop_step: int = -1       # gamma becomes 0 from this step (-1: never)
    data: Optional[str] = None            # None: the embedded default corpus
    tokenizer: Optional[str] = None       # None: bytes
    max_corpus_bytes: int = 0             # 0: no cap
    val_fraction: float = 0.01
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 1
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    max_consecutive_skips: int = 10       # non-finite steps in a row before the run stops
    moment_dtype: str = "float32"         # AdamW moments; "bfloat16" as in the paper (arXiv 2412.19437 sec. 3.3.2)
    log_expert_load: bool = False         # metrics.jsonl also gets per-expert counts and router biases

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "seq_len", "microbatches", "keep_checkpoints",
                     "checkpoint_every", "eval_every", "log_every", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise InputError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.microbatches:
            raise InputError(f"TrainConfig.global_batch_size={self.global_batch_size} is not divisible by "
                             f"microbatches={self.microbatches}")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.moment_dtype not in ("float32", "bfloat16"):
            raise InputError(f"TrainConfig.moment_dtype must be float32 or bfloat16, got {self.moment_dtype!r}")
        if self.learning_rate <= 0 or self.warmup_steps < 0:
            raise InputError("TrainConfig.learning_rate must be > 0 and warmup_steps >= 0")
        for name, allowed in (("balance_loss", ("sequence", "batch")),
                              ("bias_update_rule", ("sign", "proportional"))):
            if getattr(self, name) not in allowed:
                raise InputError(f"TrainConfig.{name}={getattr(self, name)!r} is not one of {allowed}")


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # gamma 0.01, not V3's 0.001: at this learning rate (14x V3's) the router outruns a 0.001 bias and the
    # load never balances (experiments/results/config_choices.md); it decays with the lr to 0.001 so that
    # its own +-gamma jitter does not unbalance the last steps.
    "tiny": TrainConfig(steps=300, global_batch_size=32, seq_len=128, learning_rate=3e-3, warmup_steps=30,
                        stable_steps=120, decay_steps=150, final_lr=3e-4, eval_every=50, checkpoint_every=100,
                        bias_update_rate=1e-2, bias_update_rate_final=1e-3, max_corpus_bytes=4_000_000),
    "small": TrainConfig(steps=20000, global_batch_size=64, seq_len=1024, learning_rate=1e-3, warmup_steps=500,
                         stable_steps=15000, decay_steps=4500, final_lr=1e-4),
    "bench": TrainConfig(steps=20, global_batch_size=8, seq_len=256, learning_rate=1e-4, warmup_steps=0),
    "v3-671b": TrainConfig(steps=14_800_000 // 16, global_batch_size=15360, seq_len=4096, warmup_steps=2000),
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        train = dict(d.get("train", {}))
        train["lr_tail"] = tuple(tuple(x) for x in train.get("lr_tail", ()))
        return cls(ModelConfig.from_dict(d["model"]), TrainConfig(**train), MeshConfig(**d.get("mesh", {})))

    def override(self, assignments: list[str]) -> "RunConfig":
        """Apply `section.field=value` strings (`model.n_routed_experts=16 train.steps=200`)."""
        sections = {"model": self.model, "train": self.train, "mesh": self.mesh}
        changes: dict[str, dict] = {k: {} for k in sections}
        for item in assignments:
            key, sep, raw = item.partition("=")
            section, dot, field = key.partition(".")
            if not sep or not dot or section not in sections:
                raise InputError(f"override {item!r} must look like model.FIELD=VALUE, train.FIELD=VALUE or "
                                 f"mesh.FIELD=VALUE")
            fields = {f.name: f for f in dataclasses.fields(sections[section])}
            if field not in fields:
                raise InputError(f"override {item!r}: {section} has no field {field!r}; "
                                 f"fields are {sorted(fields)}")
            try:
                changes[section][field] = _parse_value(raw, getattr(sections[section], field))
            except (ValueError, TypeError) as e:      # TypeError: a rope_scaling dict with unknown keys
                raise InputError(f"override {item!r}: {e}") from None
        return RunConfig(*(dataclasses.replace(sections[k], **changes[k]) for k in ("model", "train", "mesh")))


def _parse_value(raw: str, current: Any) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise InputError(f"expected true/false, got {raw!r}")
    elif isinstance(current, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InputError(f"expected a number, got {raw!r}")
    elif isinstance(current, int) and not isinstance(value, int):
        raise InputError(f"expected an integer, got {raw!r}")
    elif isinstance(current, float) and isinstance(value, int):
        value = float(value)
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    elif isinstance(current, RopeScaling) and isinstance(value, dict):
        value = RopeScaling(**value)
    return value


def run_preset(name: str) -> RunConfig:
    return RunConfig(get_preset(name), TRAIN_PRESETS.get(name, TrainConfig()))
