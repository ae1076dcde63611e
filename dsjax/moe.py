"""DeepSeekMoE: shared experts + fine-grained routed experts (V3 report §2.1.2, REFERENCE §4).

    s = sigmoid(x W_gate) (V3) or softmax (V2);  choose top-k of s + b within the top groups
    y = sum_k w_k E_k(x) + shared(x),  w = s[top-k] (normalised if norm_topk_prob) * scaling

The per-expert selection bias b lives in the non-trainable ``selection_bias`` collection; it
changes which experts are picked, never their weights. Dispatch is dropless: the token copies are
sorted by expert and run through grouped matmuls (``dsjax.gmm``). Under a mesh (``jax.set_mesh``)
the experts run inside ``shard_map`` (``experts_parallel``): routed experts split over ``expert``,
their hidden dim over ``tensor``, their weights gathered over ``fsdp`` (in e4m3 under FP8); token
copies travel to their experts' devices by all-to-all and back (under FP8 sent in e4m3, and the
gradient reaching the down-projection too: V3's low-precision communication, ``dsjax.fp8``).
"""

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.config import ModelConfig
from dsjax.fp8 import Fp8Recipe, Fp8Weight, block_count, fp8_init, send_e4m3, send_grad_e4m3
from dsjax.gmm import grouped_matmul
from pallas_kernels.quant import E4M3
from dsjax.mlp import MLP
from dsjax.sharding import BATCH, platform

BIAS = "selection_bias"  # variable collection of the aux-loss-free balancing bias


@flax.struct.dataclass
class RouterStats:
    """Per MoE layer (leading axis when stacked): what balancing needs."""

    expert_counts: jax.Array  # [..., E] int32: token copies routed to each expert (padding excluded)
    balance_loss: jax.Array  # [...] sequence-wise balance loss sum_i f_i P_i, mean over sequences
    dropped: jax.Array  # [...] fraction of token copies dropped by a full expert buffer (0 when dropless)


def route(scores, bias, cfg: ModelConfig):
    """Group-limited top-k on s + b; returns (expert ids [T, K], weights [T, K]) from unbiased s."""
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


def experts_dropless(x, idx, w, w_gate, w_up, w_down, impl: str = "auto", fp8: Fp8Recipe | None = None):
    """sum_k w_k SwiGLU_{idx_k}(x) for x [T, H], computing only the chosen (token, expert) pairs.

    ``fp8``: None for plain matmuls, else how the FP8 GEMMs run (``Fp8Recipe.of(cfg)``).
    The expert weights may be ``Fp8Weight`` (FP8 inference)."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # token copies grouped by expert
    sizes = jnp.bincount(flat, length=w_gate.shape[0])
    xs = x[order // k]
    h = nn.silu(grouped_matmul(xs, w_gate, sizes, impl, fp8)) * grouped_matmul(xs, w_up, sizes, impl, fp8)
    ys = grouped_matmul(h, w_down, sizes, impl, fp8)
    ys = ys[jnp.argsort(order)].reshape(t, k, -1)  # back to (token, k) order: no scatter needed
    return jnp.einsum("tkh,tk->th", ys, w.astype(ys.dtype))


def _swiglu_local(xs, eid, w_gate, w_up, w_down, impl, fp8, fsdp: str | None = None):
    """Rows ``xs`` [m, H] with local expert ids ``eid`` [m] (== num experts: an empty slot) -> [m, H].

    Rows are grouped by expert for the grouped matmuls; empty slots form one extra group whose
    weights are zero (ragged_dot instead leaves rows past the groups out, computing nothing).
    ``fsdp``: the weights are slices of H over that mesh axis, gathered by the FP8 grouped GEMMs."""
    e = w_gate.shape[0]
    order = jnp.argsort(eid, stable=True)
    sizes = jnp.bincount(eid, length=e + 1)
    ragged = impl == "ragged_dot" or (impl == "auto" and platform() == "tpu")
    if ragged:
        sizes = sizes[:e]
    else:
        w_gate, w_up, w_down = (jnp.concatenate([w, jnp.zeros_like(w[:1])]) for w in (w_gate, w_up, w_down))
    xs = xs[order]
    k_split, n_split = (None, None) if fsdp is None else ((fsdp, 1), (fsdp, 2))
    gate, up = (grouped_matmul(xs, w, sizes, impl, fp8, k_split) for w in (w_gate, w_up))
    h = nn.silu(gate) * up
    return grouped_matmul(h, w_down, sizes, impl, fp8, n_split)[jnp.argsort(order)]


def experts_parallel(x, idx, w, w_gate, w_up, w_down, cfg: ModelConfig, mesh):
    """``experts_dropless`` over the mesh: x [T, H] (tokens split over data x fsdp x expert),
    w_gate/w_up [E, H, I] and w_down [E, I, H] split (expert, fsdp, tensor) / (expert, tensor, fsdp).

    Each device sorts its token copies by destination (expert // experts per device), sends them
    with an all-to-all over ``expert``, runs its experts on what it received and sends the results
    back; the partial sums over the tensor-split hidden dim are added with a psum.
    Returns (y [T, H], fraction of token copies dropped; 0 unless ``expert_capacity_factor``)."""
    if cfg.fp8_weights:
        raise NotImplementedError("fp8_weights (FP8 inference) runs on one device; under a multi-device mesh "
                                  "load the checkpoint dequantized (fp8_weights=False)")
    impl, fp8 = cfg.moe_impl, (Fp8Recipe.of(cfg) if cfg.fp8 else None)
    n_ep = mesh.shape["expert"]
    dispatch = cfg.expert_dispatch
    if dispatch == "auto":
        dispatch = "all_to_all" if platform() == "cpu" else "ragged_all_to_all"

    fsdp = "fsdp" if fp8 is not None else None  # FP8: the grouped GEMMs gather the weights quantized

    def local(x, idx, w, w_gate, w_up, w_down):
        if fsdp is None:  # FSDP: gather the weights' hidden dim (in place: FP8's gather_along measured worse here)
            w_gate, w_up = (jax.lax.all_gather(a, "fsdp", axis=1, tiled=True) for a in (w_gate, w_up))
            w_down = jax.lax.all_gather(w_down, "fsdp", axis=2, tiled=True)
        t, k = idx.shape
        e_local = w_gate.shape[0]
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # copies by expert, hence by destination device
        rows, eid = x[order // k], flat[order]
        if n_ep == 1:
            ys, kept = _swiglu_local(rows, eid, w_gate, w_up, w_down, impl, fp8, fsdp), jnp.ones(t * k, bool)
        else:
            exchange = _a2a_fixed if dispatch == "all_to_all" else _a2a_ragged
            ys, kept = exchange(rows, eid, e_local, n_ep, cfg.expert_capacity_factor,
                                lambda r, i: _swiglu_local(r, i, w_gate, w_up, w_down, impl, fp8, fsdp), fp8)  # fmt: skip
        ys = jnp.where(kept[:, None], ys, 0)[jnp.argsort(order)].reshape(t, k, -1)
        y = jax.lax.psum(jnp.einsum("tkh,tk->th", ys, w.astype(ys.dtype)), "tensor")
        dropped = jax.lax.pmean(1.0 - kept.mean(), BATCH)
        return y, dropped

    tok = P(BATCH)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tok, tok, tok, P("expert", "fsdp", "tensor"), P("expert", "fsdp", "tensor"), P("expert", "tensor", "fsdp")),
        out_specs=(tok, P()),
        check_vma=False,
    )
    return fn(x, idx, w, w_gate, w_up, w_down)


def _capacity(m: int, n_ep: int, factor: float) -> int:
    """Receive rows per device pair for m token copies: all m when dropless, else factor x the even share."""
    return m if factor == 0 else min(m, math.ceil(factor * m / n_ep))


def _there(move, x, aux, fp8):
    """Token rows to their experts' devices: in e4m3 under FP8 (``fp8``: the recipe, else None)."""
    return move(x, aux) if fp8 is None else send_e4m3(move, x, aux, *fp8)


def _back(move, x, aux, fp8):
    """Expert results back to their tokens' devices, as they are; under FP8 their gradient (the
    down-projection's output gradient) travels the other way in e4m3."""
    return move(x, aux) if fp8 is None else send_grad_e4m3(move, x, aux, *fp8)


def _all_to_all(x, aux=()):
    return jax.lax.all_to_all(x, "expert", 0, 0, tiled=True)


def _arrivals(eid, e_local: int, n_ep: int, cap: int):
    """What each source sends here, from one all_gather of every device's per-expert row counts
    (the rows themselves go sorted by expert, at most ``cap`` per destination): [source, local
    expert] counts that fit. The receiver rebuilds the rows' expert ids from them, so no id travels."""
    counts = jax.lax.all_gather(jnp.bincount(eid, length=n_ep * e_local).astype(jnp.int32), "expert")
    counts = counts.reshape(n_ep, n_ep, e_local)  # [source, destination, local expert]
    mine = counts[:, jax.lax.axis_index("expert")]
    return counts, jnp.clip(cap - (jnp.cumsum(mine, axis=-1) - mine), 0, mine)


def _segment_ids(counts, n: int):
    """Index of the segment each of n positions falls in, segments of ``counts`` rows laid end to end
    (positions past them: len(counts))."""
    return jnp.searchsorted(jnp.cumsum(counts), jnp.arange(n), side="right").astype(jnp.int32)


def _fixed_ids(fits, cap: int):
    """Local expert ids of the fixed exchange's [source, cap] slots (e_local: an empty slot)."""
    return jax.vmap(_segment_ids, (0, None))(fits, cap)


def _ragged_ids(fits, room: int):
    """Local expert ids of the ragged exchange's ``room`` rows: the sources' chunks end to end."""
    e_local = fits.shape[-1]
    segment = _segment_ids(fits.reshape(-1), room)
    return jnp.where(segment < fits.size, segment % e_local, e_local)


def _a2a_fixed(rows, eid, e_local: int, n_ep: int, factor: float, expert_fn, fp8=None):
    """Exchange through fixed [n_ep, cap] buffers with ``all_to_all`` (every backend, CPU included).

    rows [m, H] sorted by global expert id ``eid``; returns (results in the same order, kept [m])."""
    m, hdim = rows.shape
    cap = _capacity(m, n_ep, factor)
    dest = eid // e_local
    sizes = jnp.bincount(dest, length=n_ep)
    rank = jnp.arange(m) - (jnp.cumsum(sizes) - sizes)[dest]  # slot within the destination's chunk
    kept = rank < cap
    slot = jnp.where(kept, rank, cap)  # out of range: dropped by mode="drop"
    send = jnp.zeros((n_ep, cap, hdim), rows.dtype).at[dest, slot].set(rows, mode="drop")
    recv = _there(_all_to_all, send, (), fp8)  # [source, cap, H]
    recv_id = _fixed_ids(_arrivals(eid, e_local, n_ep, cap)[1], cap)
    out = expert_fn(recv.reshape(n_ep * cap, hdim), recv_id.reshape(-1)).reshape(n_ep, cap, hdim)
    back = _back(_all_to_all, out, (), fp8)  # [destination, cap, H], our rows
    return back[dest, jnp.minimum(slot, cap - 1)], kept


def _a2a_ragged(rows, eid, e_local: int, n_ep: int, factor: float, expert_fn, fp8=None):
    """The same exchange with ``ragged_all_to_all`` (GPU/TPU): only the rows in use travel."""
    m = rows.shape[0]
    cap = _capacity(m, n_ep, factor)
    counts, fits = _arrivals(eid, e_local, n_ep, cap)
    wanted = counts.sum(-1)  # [source, destination]: rows each source has for each destination
    sent = jnp.minimum(wanted, cap)  # beyond the capacity: dropped
    starts = jnp.cumsum(wanted, axis=1) - wanted  # where those rows begin in the source's sorted rows
    me = jax.lax.axis_index("expert")
    kept = jnp.arange(m) - starts[me][eid // e_local] < cap
    before = jnp.cumsum(sent, axis=0) - sent  # rows that earlier sources put in each destination
    recv_sizes = sent[:, me]
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    room = n_ep * cap

    def send(operand, aux, n_out):  # aux: (input offsets, send sizes, output offsets, receive sizes)
        buf = jnp.zeros((n_out, *operand.shape[1:]), operand.dtype)
        return jax.lax.ragged_all_to_all(operand, buf, *aux, axis_name="expert")

    recv = _there(lambda v, a: send(v, a, room), rows, (starts[me], sent[me], before[me], recv_sizes), fp8)
    out = expert_fn(recv, _ragged_ids(fits, room))
    # Back: my received chunk from source s returns to s's sorted rows, at its start for me.
    back = _back(lambda v, a: send(v, a, m), out, (recv_offsets, recv_sizes, starts[:, me], sent[me]), fp8)
    return back, kept


def experts_dense(x, idx, w, w_gate, w_up, w_down):
    """Reference: every expert on every token, combined with a dense [T, E] weight matrix."""
    gates = jnp.zeros((x.shape[0], w_gate.shape[0]), w.dtype).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
    h = nn.silu(jnp.einsum("th,ehi->tei", x, w_gate)) * jnp.einsum("th,ehi->tei", x, w_up)
    return jnp.einsum("tei,eih,te->th", h, w_down, gates.astype(x.dtype))


class MoE(nn.Module):
    cfg: ModelConfig

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
    def __call__(self, x, token_mask):
        c = self.cfg
        b, s, hdim = x.shape
        e, i = c.n_routed_experts, c.moe_intermediate_size
        w_router = self._param("gate", (hdim, e), ("embed", "experts"))
        bias = self.variable(BIAS, "e_score_correction_bias", jnp.zeros, (e,), jnp.float32).value
        w_gate = self._expert_weights("w_gate", (e, hdim, i), ("experts", "embed", "expert_mlp"))
        w_up = self._expert_weights("w_up", (e, hdim, i), ("experts", "embed", "expert_mlp"))
        w_down = self._expert_weights("w_down", (e, i, hdim), ("experts", "expert_mlp", "embed"))

        logits = jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32), precision="highest")
        scores = jax.nn.sigmoid(logits) if c.scoring_func == "sigmoid" else jax.nn.softmax(logits, -1)
        idx, w = route(scores.reshape(b * s, e), bias, c)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            fp8 = Fp8Recipe.of(c) if c.fp8 or c.fp8_weights else None
            y = experts_dropless(x.reshape(b * s, hdim), idx, w, w_gate, w_up, w_down, c.moe_impl, fp8)
            dropped = jnp.zeros((), jnp.float32)
        else:
            y, dropped = experts_parallel(x.reshape(b * s, hdim), idx, w, w_gate, w_up, w_down, c, mesh)
        y = y.reshape(b, s, hdim)
        if c.n_shared_experts:
            y = y + MLP(c, c.n_shared_experts * i, name="shared_experts")(x)

        idx = idx.reshape(b, s, -1)
        counts = jnp.bincount(jnp.where(token_mask[..., None], idx, e).reshape(-1), length=e + 1)[:e]
        stats = RouterStats(counts.astype(jnp.int32), balance_loss(scores, idx, token_mask, e), dropped)
        return y, stats
