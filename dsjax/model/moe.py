"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V3 §2.1.2, eq. 12-20).

    s = sigmoid(x W_gate) (V3) or softmax (V2);  choose top-k of s + b within the top groups
    y = sum_k w_k E_k(x) + shared(x),  w = s[top-k] (normalised if norm_topk_prob) * scaling

The per-expert selection bias b lives in the non-trainable ``selection_bias`` collection; it
changes which experts are picked, never their weights (eq. 16). Dispatch is dropless: the token
copies are sorted by expert and run through grouped matmuls (``dsjax.model.gmm``). Under a mesh
(``jax.set_mesh``) the experts run inside ``shard_map`` (``experts_parallel``): routed experts split
over the mesh axis of ``experts``, their hidden dim over that of ``expert_mlp``, their weights
gathered over that of ``embed`` (in e4m3 under FP8); token copies travel to their experts' devices
and back (``dsjax.parallel.expert_parallel``; under FP8 in e4m3, V3's low-precision communication).
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.config import ModelConfig
from dsjax.model.fp8 import Fp8Recipe, Fp8Weight, fp8_init, send_e4m3, send_grad_e4m3
from dsjax.model.gmm import grouped_matmul
from dsjax.model.layers import MLP, swiglu
from dsjax.parallel.expert_parallel import EXPERTS, as_is, exchange, resolve_dispatch
from dsjax.parallel.rules import BATCH, mesh_axes, partition_spec
from pallas_kernels.platform import target_platform
from pallas_kernels.quant import E4M3, block_count

BIAS = "selection_bias"  # variable collection of the aux-loss-free balancing bias


@flax.struct.dataclass
class RouterStats:
    """Per MoE layer (leading axis when stacked): what balancing needs."""

    expert_counts: jax.Array  # [..., E] int32: token copies routed to each expert (padding excluded)
    balance_loss: jax.Array  # [...] sequence-wise balance loss sum_i f_i P_i, mean over sequences
    dropped: jax.Array  # [...] fraction of token copies dropped by a full expert buffer (0 when dropless)
    expert_ids: jax.Array  # [..., B, S, K] int32: the experts each token was sent to


def route(scores, bias, cfg: ModelConfig, replay=None):
    """Group-limited top-k on s + b; returns (expert ids [T, K], weights [T, K]) from unbiased s.

    ``replay`` [T, K] (-1: choose freely): routing replay for RL, the experts a rollout chose for
    the token; the gate weights are still this forward's scores at those experts."""
    t, e = scores.shape
    sel = scores + bias
    if cfg.n_group > 1:
        groups = sel.reshape(t, cfg.n_group, e // cfg.n_group)
        if cfg.topk_method == "noaux_tc":  # V3: a group scores the sum of its top-2 experts
            group_score = jax.lax.top_k(groups, 2)[0].sum(-1)
        else:  # V2 group_limited_greedy: a group scores its best expert
            group_score = groups.max(-1)
        keep = jax.lax.top_k(group_score, cfg.topk_group)[1]
        group_mask = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], keep].set(True)
        sel = jnp.where(jnp.repeat(group_mask, e // cfg.n_group, axis=1), sel, -jnp.inf)
    idx = jax.lax.top_k(sel, cfg.num_experts_per_tok)[1]
    if replay is not None:
        idx = jnp.where(replay >= 0, replay, idx)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def balance_loss(scores, idx, token_mask, num_experts: int):
    """Complementary sequence-wise loss, mean over non-empty sequences of sum_i f_i P_i (V3 eq. 17-20).

    scores [B, S, E], idx [B, S, K], token_mask [B, S]: f_i = E / (K T) * #tokens routed to i,
    P_i = mean_t s_i,t / sum_j s_j,t, both over the sequence's real tokens.
    """
    k = idx.shape[-1]
    m = token_mask.astype(jnp.float32)
    n_tok = jnp.maximum(m.sum(-1), 1.0)  # [B]
    counts = (jax.nn.one_hot(idx, num_experts, dtype=jnp.float32) * m[..., None, None]).sum((1, 2))
    f = counts * num_experts / (k * n_tok[:, None])
    p = ((scores / scores.sum(-1, keepdims=True)) * m[..., None]).sum(1) / n_tok[:, None]
    has_tokens = token_mask.any(-1)  # all-padding rows do not dilute the mean
    return jnp.sum(jnp.where(has_tokens, (f * p).sum(-1), 0.0)) / jnp.maximum(has_tokens.sum(), 1)


def _by_expert(idx):
    """Token copies grouped by expert: (order [T*K] to sort them, their expert ids in that order)."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, flat[order]


def _combine(ys, order, w):
    """sum_k w_k y_k per token, from results ys [T*K, H] in sorted order: back to (token, k) order by
    the inverse permutation (no scatter needed), then the gate-weighted sum."""
    t, k = w.shape
    ys = ys[jnp.argsort(order)].reshape(t, k, -1)
    return jnp.einsum("tkh,tk->th", ys, w.astype(ys.dtype))


def _swiglu(xs, sizes, w_gate, w_up, w_down, impl, fp8, fsdp: str | None = None, limit: float = 0.0):
    """SwiGLU of rows xs [m, H] sorted by expert, ``sizes`` rows per expert, by grouped matmuls.
    ``fsdp``: the weights are slices of H over that mesh axis, gathered by the FP8 grouped GEMMs."""
    k_split, n_split = (None, None) if fsdp is None else ((fsdp, 1), (fsdp, 2))
    gate, up = (grouped_matmul(xs, w, sizes, impl, fp8, k_split) for w in (w_gate, w_up))
    return grouped_matmul(swiglu(gate, up, limit), w_down, sizes, impl, fp8, n_split)


def experts_dropless(
    x, idx, w, w_gate, w_up, w_down, impl: str = "auto", fp8: Fp8Recipe | None = None, limit: float = 0.0
):
    """sum_k w_k SwiGLU_{idx_k}(x) for x [T, H], computing only the chosen (token, expert) pairs.

    ``fp8``: None for plain matmuls, else how the FP8 GEMMs run (``Fp8Recipe.of(cfg)``).
    The expert weights may be ``Fp8Weight`` (FP8 inference). ``limit``: ``swiglu``'s clamp."""
    order, eid = _by_expert(idx)
    sizes = jnp.bincount(eid, length=w_gate.shape[0])
    ys = _swiglu(x[order // idx.shape[1]], sizes, w_gate, w_up, w_down, impl, fp8, limit=limit)
    return _combine(ys, order, w)


def _swiglu_received(xs, eid, w_gate, w_up, w_down, impl, fp8, fsdp, limit):
    """Rows that arrived in any order, local expert ids ``eid`` (== num experts: an empty slot) -> [m, H].
    Empty slots form one extra group whose weights are zero (ragged_dot instead leaves rows past the
    groups out, computing nothing)."""
    e = w_gate.shape[0]
    order = jnp.argsort(eid, stable=True)
    sizes = jnp.bincount(eid, length=e + 1)
    if impl == "ragged_dot" or (impl == "auto" and target_platform() == "tpu"):
        sizes = sizes[:e]
    else:
        w_gate, w_up, w_down = (jnp.concatenate([w, jnp.zeros_like(w[:1])]) for w in (w_gate, w_up, w_down))
    return _swiglu(xs[order], sizes, w_gate, w_up, w_down, impl, fp8, fsdp, limit)[jnp.argsort(order)]


def e4m3_transports(fp8: Fp8Recipe):
    """The exchange's transports under FP8 (V3 §3.3.3): token rows to the experts as e4m3 1x128 tiles
    + scales; results back as they are, their gradient (the down-projection's) in e4m3."""

    def to_experts(move, x, aux):
        return send_e4m3(move, x, aux, *fp8)

    def from_experts(move, x, aux):
        return send_grad_e4m3(move, x, aux, *fp8)

    return to_experts, from_experts


def experts_parallel(x, idx, w, w_gate, w_up, w_down, cfg: ModelConfig, mesh, seq_split: bool = False):
    """``experts_dropless`` over the mesh: x [T, H] split like the batch, w_gate/w_up [E, H, I] and
    w_down [E, I, H] split by their logical axes (experts, embed, expert_mlp). ``seq_split``
    (sequence parallelism): the rows are also split over the tensor axis, each shard its own tokens,
    so the experts' hidden dim is gathered over that axis (as FSDP gathers theirs) in place of the
    psum of partial sums: no shard ever holds another's token copies.

    Each device sorts its token copies by expert, the exchange (``dsjax.parallel.expert_parallel``)
    carries them to their experts' devices and back, and the partial sums over the tensor-split
    hidden dim are added with a psum. Under FP8 the rows travel in e4m3 and the gradient reaching
    the down-projection does too (V3 §3.3.3: ``send_e4m3`` / ``send_grad_e4m3``).
    Returns (y [T, H], fraction of token copies dropped; 0 unless ``expert_capacity_factor``)."""
    if cfg.fp8_weights:
        raise NotImplementedError(
            "fp8_weights (FP8 inference) runs on one device; under a multi-device mesh "
            "load the checkpoint dequantized (fp8_weights=False)"
        )
    impl, fp8 = cfg.moe_impl, (Fp8Recipe.of(cfg) if cfg.fp8 else None)
    dispatch = resolve_dispatch(cfg.expert_dispatch, target_platform())
    fsdp, tensor = mesh_axes("embed"), mesh_axes("expert_mlp")
    to_experts, from_experts = e4m3_transports(fp8) if fp8 is not None else (as_is, as_is)
    gathered_in_fp8 = fsdp if fp8 is not None else None  # FP8: the grouped GEMMs gather the weights in e4m3

    if seq_split and mesh_axes("seq") != tensor:
        raise ValueError("sequence parallelism splits the rows over the axis the experts' hidden dim is split on")

    def local(x, idx, w, w_gate, w_up, w_down):
        if seq_split:  # this shard's own rows: the experts' whole hidden dim (its transpose: a reduce-scatter)
            w_gate, w_up = (jax.lax.all_gather(a, tensor, axis=2, tiled=True) for a in (w_gate, w_up))
            w_down = jax.lax.all_gather(w_down, tensor, axis=1, tiled=True)
        if fp8 is None:  # FSDP: gather the weights' hidden dim (in place: FP8's gather_along measured worse here)
            w_gate, w_up = (jax.lax.all_gather(a, fsdp, axis=1, tiled=True) for a in (w_gate, w_up))
            w_down = jax.lax.all_gather(w_down, fsdp, axis=2, tiled=True)
        order, eid = _by_expert(idx)
        rows = x[order // idx.shape[1]]

        def run(r, i):
            return _swiglu_received(r, i, w_gate, w_up, w_down, impl, fp8, gathered_in_fp8, cfg.swiglu_limit)

        if mesh.shape[EXPERTS] == 1:
            ys, kept = run(rows, eid), jnp.ones(eid.shape, bool)
        else:
            ys, kept = exchange(
                rows, eid, w_gate.shape[0], cfg.expert_capacity_factor, run, dispatch, to_experts, from_experts
            )
        y = _combine(jnp.where(kept[:, None], ys, 0), order, w)
        return (y if seq_split else jax.lax.psum(y, tensor)), jax.lax.pmean(1.0 - kept.mean(), BATCH)

    tok = partition_spec(("tokens",) if seq_split else ("batch",))
    up, down = partition_spec(("experts", "embed", "expert_mlp")), partition_spec(("experts", "expert_mlp", "embed"))
    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, up, up, down), out_specs=(tok, P()), check_vma=False)
    return fn(x, idx, w, w_gate, w_up, w_down)


def experts_dense(x, idx, w, w_gate, w_up, w_down, limit: float = 0.0):
    """Reference: every expert on every token, combined with a dense [T, E] weight matrix."""
    gates = jnp.zeros((x.shape[0], w_gate.shape[0]), w.dtype).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
    h = swiglu(jnp.einsum("th,ehi->tei", x, w_gate), jnp.einsum("th,ehi->tei", x, w_up), limit)
    return jnp.einsum("tei,eih,te->th", h, w_down, gates.astype(x.dtype))


def router_scores(logits, scoring_func: str):
    """s = sigmoid (V3), softmax (V2) or sqrt(softplus) (V4) of the router logits, fp32."""
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    if scoring_func == "softmax":
        return jax.nn.softmax(logits, -1)
    return jnp.sqrt(jax.nn.softplus(logits))


def hash_table(vocab: int, experts: int, k: int):
    """A fixed token -> k distinct experts table (V4's hash routing, for a model trained from
    scratch; a checkpoint brings its own ``tid2eid``): a multiplicative hash of the token id picks
    the first expert, the others follow at stride experts // k."""
    base = (jnp.arange(vocab, dtype=jnp.uint32) * jnp.uint32(2654435761)) % jnp.uint32(experts)
    return ((base[:, None] + jnp.arange(k, dtype=jnp.uint32) * (experts // k)) % experts).astype(jnp.int32)


class MoE(nn.Module):
    """``hashed``: V4's hash-routed layer: the experts are the frozen ``tid2eid[token]`` (in the
    ``selection_bias`` collection, never trained), the gate still weighs them."""

    cfg: ModelConfig
    hashed: bool = False

    def _param(self, name, shape, axes):
        init = nn.with_logical_partitioning(nn.initializers.normal(self.cfg.initializer_range), axes)
        return self.param(name, init, shape, jnp.dtype(self.cfg.param_dtype))

    def _expert_weights(self, name, shape, axes):
        """[E, K, N] in the compute dtype (``fp8``: the param dtype), or (``fp8_weights``) e4m3 +
        ``<name>_scale_inv`` blocks."""
        c = self.cfg
        if not c.fp8_weights:
            w = self._param(name, shape, axes)
            return w if c.fp8 else w.astype(c.dtype)  # fp8: quantized from the fp32 master, not a bf16 copy
        q_init, s_init = fp8_init(c.initializer_range)
        q = self.param(name, nn.with_logical_partitioning(q_init, axes), shape, E4M3)
        s = self.param(f"{name}_scale_inv", s_init, (shape[0], *map(block_count, shape[1:])), jnp.float32)
        return Fp8Weight(q, s)

    @nn.compact
    def __call__(self, x, token_mask, replay=None, seq_split: bool = False, tokens=None):
        """x [B, S, H]; ``replay`` [B, S, K]: see ``route``; ``seq_split``: x is split along the
        sequence too (``experts_parallel``); ``tokens`` [B, S]: the token ids (hash routing).
        Returns (y, RouterStats)."""
        c = self.cfg
        b, s, hdim = x.shape
        e, i = c.n_routed_experts, c.moe_intermediate_size
        w_router = self._param("gate", (hdim, e), ("embed", "experts"))
        if self.hashed:
            table = self.variable(BIAS, "tid2eid", hash_table, c.vocab_size, e, c.num_experts_per_tok).value
        else:
            bias = self.variable(BIAS, "e_score_correction_bias", jnp.zeros, (e,), jnp.float32).value
        w_gate = self._expert_weights("w_gate", (e, hdim, i), ("experts", "embed", "expert_mlp"))
        w_up = self._expert_weights("w_up", (e, hdim, i), ("experts", "embed", "expert_mlp"))
        w_down = self._expert_weights("w_down", (e, i, hdim), ("experts", "expert_mlp", "embed"))

        logits = jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32), precision="highest")
        scores = router_scores(logits, c.scoring_func)
        if self.hashed:  # V4 §2.1: the experts are the table's, the weights the gate's
            idx = jnp.take(table, tokens.reshape(-1), axis=0)
            w = jnp.take_along_axis(scores.reshape(b * s, e), idx, axis=-1)
            w = w / (w.sum(-1, keepdims=True) + 1e-20) * c.routed_scaling_factor
        else:
            idx, w = route(scores.reshape(b * s, e), bias, c, None if replay is None else replay.reshape(b * s, -1))
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            fp8 = Fp8Recipe.of(c) if c.fp8 or c.fp8_weights else None
            y = experts_dropless(x.reshape(b * s, hdim), idx, w, w_gate, w_up, w_down, c.moe_impl, fp8, c.swiglu_limit)
            dropped = jnp.zeros((), jnp.float32)
        else:
            y, dropped = experts_parallel(x.reshape(b * s, hdim), idx, w, w_gate, w_up, w_down, c, mesh, seq_split)
        y = y.reshape(b, s, hdim)
        if c.n_shared_experts:
            y = y + MLP(c, c.n_shared_experts * i, name="shared_experts")(x)

        idx = idx.reshape(b, s, -1)
        counts = jnp.bincount(jnp.where(token_mask[..., None], idx, e).reshape(-1), length=e + 1)[:e]
        balance = jnp.zeros((), jnp.float32) if self.hashed else balance_loss(scores, idx, token_mask, e)
        stats = RouterStats(counts.astype(jnp.int32), balance, dropped, idx)
        return y, stats
