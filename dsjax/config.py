"""Typed, validated run configuration: the sections of a ``configs/*.yaml`` file.

    cfg = load_config("configs/tiny.yaml", ["model.num_hidden_layers=4"])   # Config(model, train, data, mesh)

``ModelConfig``'s field names follow Hugging Face's ``DeepseekV3Config``, so hub ``config.json`` files
map one to one (``dsjax.hf.config``); the fields after "ours" are dsjax's own. Every value is
type-checked and validated when the dataclass is built, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the field and the rule."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (arXiv 2309.00071, as DeepSeek-V2 §3.1.4 uses it); HF's ``rope_scaling``."""

    factor: float
    original_max_position_embeddings: int
    type: Literal["yarn"] = "yarn"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        _check_types(self, "rope_scaling.")
        if self.factor < 1:
            raise ConfigError(f"rope_scaling.factor={self.factor!r}: must be >= 1")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings: must be a positive integer")
        if self.beta_slow <= 0:
            raise ConfigError(f"rope_scaling.beta_slow={self.beta_slow!r}: must be > 0")
        if self.beta_fast <= self.beta_slow:
            raise ConfigError(f"rope_scaling.beta_fast={self.beta_fast!r}: must exceed beta_slow={self.beta_slow!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # -- sizes (HF names) --
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # -- MLA --
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    # -- DeepSeekMoE --
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: Literal["noaux_tc", "group_limited_greedy", "greedy"] = "noaux_tc"
    scoring_func: Literal["sigmoid", "softmax", "sqrtsoftplus"] = "sigmoid"  # V4: sqrt(softplus(logits))
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    # -- MTP --
    num_nextn_predict_layers: int = 1
    # -- DeepSeek Sparse Attention (V3.2 report §2.1; HF DeepseekV32Config): a lightning indexer per
    # MLA layer picks index_topk keys per query; 0 = dense attention, no indexer (V2 / V3) --
    index_topk: int = 0
    index_n_heads: int = 64
    index_head_dim: int = 128
    # -- DeepSeek-V4 (architecture "v4"; HF DeepseekV4Config names). Attention is shared-KV MQA over a
    # sliding window of head_dim keys plus, per layer type, compressed entries (CSA: every
    # compress_rate_csa tokens, top index_topk picked by a lightning indexer; HCA: every
    # compress_rate_hca tokens, all visible); qk_rope_head_dim trailing channels rotate; hc_mult
    # residual streams mixed by mHC; mlp_layer_types picks hash or learned routing per layer --
    architecture: Literal["v3", "v4"] = "v3"  # v3: MLA + DeepSeekMoE (V2, V3, V3.2); v4: DeepSeek-V4
    head_dim: int = 512
    layer_types: tuple[
        Literal["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"], ...
    ] = ()
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    compress_rope_theta: float = 160000.0  # RoPE base of CSA / HCA layers (and YaRN, when rope_scaling is set)
    sliding_window: int = 128  # keys t-W+1..t of the query's own segment
    o_groups: int = 8
    o_lora_rank: int = 1024
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: tuple[Literal["hash_moe", "moe"], ...] = ()
    swiglu_limit: float = 0.0  # clamp of the experts' gate (above) and up (both sides); 0: none (V3)
    # -- misc (HF names) --
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = "silu"
    # -- ours --
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    moe_impl: Literal["auto", "ragged_dot", "blocked", "rows"] = "auto"  # dsjax.model.gmm
    remat: Literal["none", "full", "save_projections"] = "none"  # activation checkpointing per layer
    # Sequence parallelism for long context (training): between the attention and the FFN the residual
    # stream, and the logits, are split along the sequence over the tensor axis (Megatron-SP), so a
    # chip holds 1/tensor of each sequence's saved activations; attention gathers the sequence.
    sequence_parallel: bool = False
    attention_impl: Literal["auto", "xla", "pallas", "interpret"] = "auto"  # dsjax.model.attention
    fp8: bool = False  # V3's FP8 recipe for the projections it quantizes (V3 report §3.3)
    fp8_impl: Literal["auto", "xla", "pallas", "interpret"] = "auto"  # pallas_kernels.platform
    # FP8 scales (fp8 or fp8_weights): any float32, or powers of two ("ue8m0", as DeepSeek-V3.1 on).
    fp8_scale_fmt: Literal["float32", "ue8m0"] = "float32"
    # FP8 inference: the projections V3 quantizes hold e4m3 weights + 128x128 block scales, as the
    # FP8 hub release stores them (dsjax.model.fp8.Fp8Linear; load_hf(path, fp8_weights=True)).
    fp8_weights: bool = False
    # DSA's first training stage (V3.2 report §2.1.1, "dense warm-up"): attention stays dense and
    # only the indexer learns, by KL to the attention's distribution; false = sparse attention.
    indexer_warmup: bool = False
    # Expert parallelism (dsjax.parallel.expert_parallel, mesh.expert > 1): how token copies travel to their experts'
    # devices, and the receive buffer per device pair (0 = dropless: room for every copy).
    expert_dispatch: Literal["auto", "all_to_all", "ragged_all_to_all"] = "auto"
    expert_capacity_factor: float = 0.0

    def __post_init__(self):
        _check_types(self)
        _validate(self)

    # Derived sizes, never stored.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_v4(self) -> bool:
        return self.architecture == "v4"

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> ModelConfig:
        """From plain values (YAML, JSON); errors name each field as ``<where>.<field>``."""
        return _build(cls, d, where)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings (defaults: DeepSeek-V3 pre-training, V3 report §4.2)."""

    run_name: str = ""  # runs/<run_name>/; default: the config file's stem
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, over all microbatches and devices
    microbatches: int = 1  # gradient accumulation
    seq_len: int = 512
    # LR: linear warmup -> constant -> cosine to min_lr -> min_lr for min_lr_steps -> tail_lr
    learning_rate: float = 2.2e-4
    warmup_steps: int = 2000
    constant_steps: int = 0
    decay_steps: int = 0
    min_lr: float = 2.2e-5
    min_lr_steps: int = 0
    tail_lr: float = 7.3e-6
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    moment_dtype: Literal["float32", "bfloat16"] = "float32"  # Adam's moments (V3: bfloat16, report §3.3.3)
    mtp_loss_weight: float = 0.3  # lambda (0.3 early in V3, 0.1 later)
    balance_loss_alpha: float = 1e-4  # sequence-wise balance loss weight
    bias_update_rate: float = 1e-3  # gamma of aux-loss-free balancing
    bias_update_stop_step: int = -1  # gamma -> 0 from this step on (-1: never)
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 20  # consecutive skipped steps before training stops
    sample_tokens: int = 200  # length of the text sample generated at the end
    sample_prompt: str = "def "
    # A run or hub checkpoint whose weights a new run starts from (step 0, fresh optimizer). Every one
    # of its tensors must fit the model; the model's indexers may be missing from it: a V3 checkpoint
    # starts a V3.2 (DSA) model with fresh indexers, as DeepSeek began V3.2 (report §2.1.1).
    init_from: str = ""

    def __post_init__(self):
        _check_types(self, "train.")
        for f in (
            "steps",
            "batch_size",
            "microbatches",
            "seq_len",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
            "max_nonfinite_steps",
        ):
            if getattr(self, f) <= 0:
                raise ConfigError(f"train.{f}={getattr(self, f)!r}: must be a positive integer")
        for f in ("warmup_steps", "constant_steps", "decay_steps", "min_lr_steps", "sample_tokens"):
            if getattr(self, f) < 0:
                raise ConfigError(f"train.{f}={getattr(self, f)!r}: must be >= 0")
        if self.batch_size % self.microbatches:
            raise ConfigError(
                f"train.batch_size={self.batch_size}: must be divisible by train.microbatches={self.microbatches}"
            )
        for f in (
            "learning_rate",
            "min_lr",
            "tail_lr",
            "weight_decay",
            "mtp_loss_weight",
            "balance_loss_alpha",
            "bias_update_rate",
        ):
            if getattr(self, f) < 0:
                raise ConfigError(f"train.{f}={getattr(self, f)!r}: must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"train.beta1/beta2=({self.beta1}, {self.beta2}): must be in [0, 1)")
        if self.grad_clip <= 0 or self.eps <= 0:
            raise ConfigError("train.grad_clip and train.eps: must be > 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training text. Empty ``paths``: the Python standard library's own source (on every machine)."""

    paths: tuple[str, ...] = ()  # text files / globs, or .npy token arrays (pre-tokenized)
    tokenizer: str = "byte"  # "byte" (256 bytes + BOS/EOS/PAD) or a tokenizers tokenizer.json
    validation_fraction: float = 0.02  # of files (hash of the path) held out

    def __post_init__(self):
        _check_types(self, "data.")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"data.validation_fraction={self.validation_fraction!r}: must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (dsjax.parallel.mesh); one of them may be -1: the rest of the devices."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        _check_types(self, "mesh.")
        sizes = dataclasses.asdict(self)
        for name, n in sizes.items():
            if n == 0 or n < -1:
                raise ConfigError(f"mesh.{name}={n}: must be a positive integer, or -1 for the remaining devices")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1 (the rest of the devices), got {sizes}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Post-training prompts with verifiable answers (``dsjax.rl.tasks``): a procedural task (no
    download) or a JSONL file of ``{"prompt", "answer"}`` lines."""

    name: str = "chain_sum"  # chain_sum | reasoning_gym:<dataset> | path/to/prompts.jsonl
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)  # the generator's settings
    train_examples: int = 4096  # procedural: prompts drawn for training (seed = train.seed)
    eval_examples: int = 128  # held out (another seed; a JSONL: its last ones), scored greedily

    def __post_init__(self):
        _check_types(self, "task.")
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"task.kwargs={self.kwargs!r}: must be a mapping of the generator's settings")
        for f in ("train_examples", "eval_examples"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"task.{f}={getattr(self, f)!r}: must be a positive integer")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Cold-start supervised fine-tuning (DeepSeek-R1 §2.3.1): prompt/response pairs packed into
    sequences, the loss on response tokens only. Optimizer settings other than these: ``train``."""

    init_from: str = ""  # a training run or hub checkpoint directory; "": fresh weights
    data: str = ""  # a JSONL of {"prompt", "response"}; "": the task's worked solutions
    steps: int = 200
    batch_size: int = 16  # packed sequences per step
    seq_len: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 10

    def __post_init__(self):
        _check_types(self, "sft.")
        for f in ("steps", "batch_size", "seq_len"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"sft.{f}={getattr(self, f)!r}: must be a positive integer")
        if self.learning_rate < 0 or self.warmup_steps < 0:
            raise ConfigError("sft.learning_rate and sft.warmup_steps: must be >= 0")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimization (DeepSeekMath §4.1, eq. 3; ``dsjax.rl.grpo``). Names and
    defaults follow TRL's GRPOConfig where it has the setting; defaults are the paper's."""

    init_from: str = ""  # a run or hub directory; "": the SFT stage's result (or fresh weights)
    steps: int = 100  # rollout batches
    prompts_per_step: int = 16
    num_generations: int = 8  # G completions per prompt
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    reward_funcs: tuple[str, ...] = ("accuracy", "format")  # names in dsjax.rl.rewards or module:function
    reward_weights: tuple[float, ...] = ()  # one per reward function; (): all 1
    scale_rewards: Literal["group", "batch", "none"] = "group"  # "none": advantages without the std division
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"  # per sequence (paper) / per token / constant
    epsilon: float = 0.2  # clip range below 1
    epsilon_high: float | None = None  # clip range above 1 (None: epsilon; DAPO: 0.28)
    beta: float = 0.04  # KL weight (k3 estimator); 0: no reference model is kept
    num_iterations: int = 1  # mu: policy updates per rollout batch
    drop_equal_reward_groups: bool = False  # groups whose rewards are all equal leave the loss
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    microbatches: int = 1
    update_bias: bool = False  # keep updating the aux-loss-free selection bias during RL
    routing_replay: bool = False  # the update routes each token to the experts its rollout chose
    train_mtp: bool = False  # MTP modules stay frozen unless set (then: their CE on the completions)
    speculative: bool = False  # MTP modules draft rollout tokens
    rollout_engine: Literal["generate", "paged"] = "generate"  # paged: the serving engine (dsjax.infer.engine)
    eval_every: int = 20

    def __post_init__(self):
        _check_types(self, "grpo.")
        for f in ("steps", "prompts_per_step", "max_completion_length", "num_iterations", "microbatches", "eval_every"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"grpo.{f}={getattr(self, f)!r}: must be a positive integer")
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations={self.num_generations}: a group needs >= 2 completions")
        if (self.prompts_per_step * self.num_generations) % self.microbatches:
            raise ConfigError(
                f"grpo.microbatches={self.microbatches}: must divide prompts_per_step x num_generations "
                f"= {self.prompts_per_step * self.num_generations}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature={self.temperature}: rollouts sample, so it must be > 0")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"grpo.top_p={self.top_p}, top_k={self.top_k}: need top_p in (0, 1], top_k >= 0")
        if not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ConfigError(f"grpo.epsilon={self.epsilon}, epsilon_high={self.epsilon_high}: need [0, 1) and >= 0")
        if self.beta < 0 or self.learning_rate < 0 or self.warmup_steps < 0:
            raise ConfigError("grpo.beta, grpo.learning_rate and grpo.warmup_steps: must be >= 0")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"grpo.reward_weights: {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward_funcs"
            )
        if not self.reward_funcs:
            raise ConfigError("grpo.reward_funcs: name at least one reward function")
        if self.rollout_engine == "paged" and self.speculative:
            raise ConfigError("grpo.rollout_engine=paged does not draft with the MTP modules yet: set speculative off")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: the sections of a configs/*.yaml file."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # Post-training (R1's recipe, ``dsjax.rl``): a config with either runs SFT, then GRPO, on ``task``.
    task: TaskConfig | None = None
    sft: SFTConfig | None = None
    grpo: GRPOConfig | None = None

    def __post_init__(self):
        _check_types(self)
        if (self.grpo or (self.sft and not self.sft.data)) and self.task is None:
            raise ConfigError(
                "grpo, and sft without sft.data, need a 'task:' section (prompts, answers), e.g. {name: chain_sum}"
            )
        if self.model.fp8_weights:
            raise ConfigError(
                "model.fp8_weights=True: e4m3 weights are for inference and cannot be trained; "
                "train with model.fp8=true (fp32 master weights, FP8 GEMMs)"
            )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _validate(c: ModelConfig) -> None:
    def rule(ok: bool, field: str, msg: str):
        if not ok:
            raise ConfigError(f"{field}={getattr(c, field)!r}: {msg}")

    for f in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "max_position_embeddings",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
    ):
        rule(getattr(c, f) > 0, f, "must be a positive integer")
    rule(c.q_lora_rank is None or c.q_lora_rank > 0, "q_lora_rank", "must be positive, or null for a plain q_proj")
    rule(c.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
    rule(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
    rule(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "RoPE rotates pairs of channels, so it must be even")
    rule(
        0 <= c.first_k_dense_replace <= c.num_hidden_layers,
        "first_k_dense_replace",
        f"must be between 0 and num_hidden_layers={c.num_hidden_layers}",
    )
    rule(c.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
    rule(
        c.expert_capacity_factor == 0 or c.expert_capacity_factor >= 1,
        "expert_capacity_factor",
        "must be 0 (dropless) or >= 1 (receive room for that many times the even share of token copies)",
    )
    rule(c.initializer_range > 0, "initializer_range", "must be > 0")
    rule(
        not (c.fp8 and c.fp8_weights),
        "fp8_weights",
        "stores e4m3 weights for inference, while fp8=True trains fp32 masters with FP8 GEMMs: set one of them",
    )
    rule(
        c.fp8_scale_fmt == "float32" or c.fp8 or c.fp8_weights,
        "fp8_scale_fmt",
        "sets the scales of FP8 GEMMs; without fp8 or fp8_weights there are none",
    )
    rule(c.rope_theta > 1, "rope_theta", "must be > 1")
    rule(c.index_topk >= 0, "index_topk", "must be >= 0 (0 = dense attention, no indexer)")
    if c.index_topk:
        rule(c.q_lora_rank is not None, "index_topk", "the indexer reads the query LoRA latent; set q_lora_rank")
        rule(c.index_n_heads > 0, "index_n_heads", "must be a positive integer")
        rule(
            c.index_head_dim >= c.qk_rope_head_dim and c.index_head_dim % 2 == 0,
            "index_head_dim",
            f"must be even and hold the qk_rope_head_dim={c.qk_rope_head_dim} channels RoPE rotates",
        )
    rule(not c.indexer_warmup or c.index_topk > 0, "indexer_warmup", "trains the DSA indexer; set index_topk > 0")
    rule(c.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
    rule(c.swiglu_limit >= 0, "swiglu_limit", "must be >= 0 (0 = no clamp)")
    if c.is_v4:
        _validate_v4(c, rule)
    rule(
        c.n_routed_experts % c.n_group == 0,
        "n_routed_experts",
        f"must be divisible by n_group={c.n_group} (experts are split into equal groups)",
    )
    rule(c.topk_group <= c.n_group, "topk_group", f"cannot exceed n_group={c.n_group}")
    per_group = c.n_routed_experts // c.n_group
    rule(
        c.num_experts_per_tok <= c.topk_group * per_group,
        "num_experts_per_tok",
        f"the {c.topk_group} kept group(s) of {per_group} expert(s) hold only "
        f"{c.topk_group * per_group} experts to choose from",
    )
    rule(
        c.topk_method != "greedy" or c.n_group == 1,
        "topk_method",
        f"'greedy' does not limit groups but n_group={c.n_group}; set n_group=1 and topk_group=1, "
        "or use 'group_limited_greedy' / 'noaux_tc'",
    )
    rule(
        c.topk_method != "noaux_tc" or c.n_group == 1 or per_group >= 2,
        "topk_method",
        f"'noaux_tc' scores a group by its top-2 experts, but each group holds {per_group}",
    )


def _validate_v4(c: ModelConfig, rule) -> None:
    n = c.num_hidden_layers
    for f in ("layer_types", "mlp_layer_types"):
        rule(len(getattr(c, f)) == n, f, f"a DeepSeek-V4 config lists one entry per layer: {n} of them")
    for f in ("head_dim", "compress_rate_csa", "compress_rate_hca", "sliding_window", "o_groups", "o_lora_rank"):
        rule(getattr(c, f) > 0, f, "must be a positive integer")
    rule(c.hc_mult >= 1 and c.hc_sinkhorn_iters >= 1, "hc_mult", "hc_mult and hc_sinkhorn_iters must be >= 1")
    rule(c.hc_eps > 0, "hc_eps", "must be > 0")
    rule(c.q_lora_rank is not None, "q_lora_rank", "DeepSeek-V4's queries come from a LoRA latent; set it")
    rule(
        c.qk_rope_head_dim <= c.head_dim,
        "qk_rope_head_dim",
        f"RoPE rotates the trailing channels of each head_dim={c.head_dim} head: at most that many",
    )
    rule(
        c.num_attention_heads % c.o_groups == 0,
        "o_groups",
        f"the grouped output projection splits num_attention_heads={c.num_attention_heads} heads evenly",
    )
    rule(c.first_k_dense_replace == 0, "first_k_dense_replace", "DeepSeek-V4 has no dense layers: set 0")
    rule(
        c.n_group == 1 and c.topk_group == 1,
        "n_group",
        "DeepSeek-V4 routes without expert groups: set n_group=1, topk_group=1",
    )
    if "compressed_sparse_attention" in c.layer_types:
        rule(c.index_topk > 0, "index_topk", "CSA layers keep index_topk compressed entries per query: must be > 0")
        rule(c.index_n_heads > 0, "index_n_heads", "must be a positive integer")
        rule(
            c.qk_rope_head_dim <= c.index_head_dim,
            "index_head_dim",
            f"the indexer rotates qk_rope_head_dim={c.qk_rope_head_dim} trailing channels: at least that many",
        )
    rule(not c.indexer_warmup, "indexer_warmup", "is V3.2's DSA warm-up; DeepSeek-V4 has no such stage here")
    rule(not c.sequence_parallel, "sequence_parallel", "is not implemented for DeepSeek-V4 attention yet")


# ---------------------------------------------------------------------------------------------
# Building typed dataclasses from plain dicts (YAML, CLI overrides, HF json).


def _closest(name: str, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(options))}"


def _build(cls, d: Any, where: str):
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            what = f"{where}.{k}: unknown key" if where else f"unknown section '{k}'"
            raise ConfigError(f"{what}{_closest(k, names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def _coerce(v: Any, tp, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(v, tp, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if origin is Literal:
        if v not in args:
            raise ConfigError(f"{where}={v!r}: must be one of {', '.join(map(repr, args))}")
        return v
    if origin is tuple:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}={v!r}: must be a list")
        return tuple(_coerce(x, args[0], f"{where}[{i}]") for i, x in enumerate(v))
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}={v!r}: must be a string")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}={v!r}: must be true or false")
        return v
    if tp is int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise ConfigError(f"{where}={v!r}: must be an integer")
        return int(v)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}={v!r}: must be a number")
        return float(v)
    return v


def _check_types(obj, prefix: str = "") -> None:
    """Direct construction (``ModelConfig(hidden_size="64")``) gets the same checks as YAML."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        coerced = _coerce(v, hints[f.name], prefix + f.name)
        if coerced is not v:
            object.__setattr__(obj, f.name, coerced)


class _Loader(yaml.SafeLoader):
    """YAML with 1.2-style floats: ``1e-5`` is a number, not a string as in YAML 1.1."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. model.hidden_size=256")
    key, raw = item.split("=", 1)
    return key.strip().split("."), _yaml(raw)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``a.b=value`` overrides (values parsed as YAML) to a nested dict, returning a copy."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        keys, value = _parse_override(item)
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
    return d


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Loads a YAML run config (sections ``model``, ``train``, ``data``) with ``section.key=value``
    overrides; every value is type-checked and validated before anything compiles."""
    with open(path) as f:
        d = _yaml(f) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'model:' section")
    d = apply_overrides(d, list(overrides))
    if "model" not in d and set(d) <= {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"{path}: missing the 'model:' section")  # (an unknown section is named first)
    d.setdefault("train", {})
    d["train"].setdefault("run_name", Path(path).stem)
    return _build(Config, d, "")
