"""DeepSeek-V4's attention (V4 report §2.3): shared-KV MQA over a sliding window plus compressed entries.

    c_q = RMSNorm(x W_qa);  q_h = RMSNorm_unweighted(c_q W_qb)_h;  kv = RMSNorm(x W_kv)      (one KV head, K = V)
    RoPE on the trailing qk_rope_head_dim channels of q and kv (interleaved pairs): base rope_theta in
    sliding layers, compress_rope_theta (+ YaRN) in compressed ones
    keys of query t: kv_{t-W+1..t} (sliding window, W = sliding_window) and, per layer type,
        sliding_attention                  nothing more
        heavily_compressed_attention (HCA) every complete compressed entry (rate compress_rate_hca)
        compressed_sparse_attention (CSA)  the index_topk entries (rate compress_rate_csa) of highest
                                           lightning-indexer score I_ts = sum_j w_tj ReLU(q^I_tj . k^I_s)
    o_h = sum_k p_hk v_k with p_h = softmax over [logits_h ; sink_h] (a learned per-head sink, eq. 26),
          then RoPE at -t on o's rope channels (K = V carried the keys' rotation into o)
    y = W_ob [ W_oa^(g) o_(group g) ]_g   the grouped output projection: o_groups groups of heads,
                                          each to o_lora_rank, concatenated, then to hidden_size

Names as the hub's ``attn.*`` tensors (``wq_a``, ``q_norm``, ``wq_b``, ``wkv``, ``kv_norm``, ``wo_a``,
``wo_b``, ``attn_sink``, ``compressor.*``, ``indexer.*``); the exact semantics (window of W keys
including the query's own, sinks in the softmax denominator, the compressed entries' positions and
visibility) follow HF transformers' ``DeepseekV4Attention``.

Training runs on blocks of W queries (a ``lax.map`` of a ``jax.checkpoint``): each block sees its own
W keys and the previous block's, and the compressed entries (HCA: all it may see; CSA: the indexer
scores all it may see, then each query's top k are gathered), so no [S, S] array exists and CSA's
attention costs O(S k). Decoding keeps per layer a ``HybridCache``: the window's recent keys, the
compressor's recent projected tokens, the entries (and reads CSA's top k the same way).
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.attention import gather_slots
from dsjax.model.compressor import Compressor, window_ends, windows_before
from dsjax.model.layers import RMSNorm, linear
from dsjax.model.rope import apply_rope, inv_frequencies

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def compress_rate(cfg: ModelConfig, layer_type: str) -> int:
    return {CSA: cfg.compress_rate_csa, HCA: cfg.compress_rate_hca}.get(layer_type, 0)


def rope_frequencies(cfg: ModelConfig, layer_type: str) -> np.ndarray:
    """inv_freq of a layer type: rope_theta, plain, for sliding layers; compress_rope_theta with YaRN
    (rope_scaling, without YaRN's magnitude factor, as the release) for compressed ones."""
    if layer_type == SLIDING:
        return inv_frequencies(cfg.replace(rope_scaling=None))
    return inv_frequencies(cfg.replace(rope_theta=cfg.compress_rope_theta))


def angles(inv_freq, positions):
    """(cos, sin) [..., r/2] of positions * inv_freq."""
    f = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(f), jnp.sin(f)


def rope_tail(x, cos, sin):
    """RoPE on the trailing 2 cos.shape[-1] channels of x (V4 lays each head out as [nope | rope])."""
    r = 2 * cos.shape[-1]
    return jnp.concatenate([x[..., :-r], apply_rope(x[..., -r:], cos, sin)], axis=-1)


def attend(q, keys, visible, sinks, scale, picked=None, picked_ok=None):
    """softmax over [q.k * scale ; sink] (the sink only in the denominator), times the keys (K = V).

    q [b, Q, h, d]; keys [b, K, d] shared by the queries, visible [b, Q, K] bool; ``picked`` [b, Q, k, d]
    each query's own keys besides (CSA's selected entries), ``picked_ok`` [b, Q, k] bool; sinks [h].
    Returns ([b, Q, h, d], the probabilities [b, h, Q, K (+ k)])."""
    logits = jnp.einsum("bqhd,bkd->bhqk", q, keys, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(visible[:, None], logits, -jnp.inf)
    if picked is not None:
        own = jnp.einsum("bqhd,bqkd->bhqk", q, picked, preferred_element_type=jnp.float32) * scale
        logits = jnp.concatenate([logits, jnp.where(picked_ok[:, None], own, -jnp.inf)], axis=-1)
    sink = sinks.astype(jnp.float32)[None, :, None]
    top = jnp.maximum(logits.max(-1), sink)
    p = jnp.exp(logits - top[..., None])
    p = p / (p.sum(-1) + jnp.exp(sink - top))[..., None]
    n = keys.shape[1]
    o = jnp.einsum("bhqk,bkd->bqhd", p[..., :n].astype(keys.dtype), keys)
    if picked is not None:
        o = o + jnp.einsum("bhqk,bqkd->bqhd", p[..., n:].astype(picked.dtype), picked)
    return o, p


def indexer_kl(p, scores, selected):
    """KL(p || softmax(I)) over each query's selected entries [b, Q] (V3.2 §2.1.1's sparse-stage loss,
    as dsjax trains V4's CSA indexer): p [b, h, Q, k] the attention on the k selected entries, summed
    over heads and L1-normalised, a fixed target; I [b, Q, k] their index scores; ``selected`` [b, Q, k]
    which of the k are real (a query that sees fewer entries has fewer)."""
    target = jax.lax.stop_gradient(jnp.where(selected, p.sum(1), 0.0))
    target = target / jnp.maximum(target.sum(-1, keepdims=True), 1e-20)
    log_q = jax.nn.log_softmax(jnp.where(selected, scores, -1e30), axis=-1)  # finite: a row may select none
    terms = jnp.where(selected & (target > 0), target * (jnp.log(jnp.maximum(target, 1e-20)) - log_q), 0.0)
    return terms.sum(-1)


def select_entries(scores, k: int):
    """Each query's k highest-scoring entries among those with a finite score (fewer if it sees fewer):
    (indices [b, Q, k'], real [b, Q, k'], their scores), k' = min(k, entries)."""
    top, idx = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    return idx, top > -jnp.inf, top


def index_scores(iq, iw, ik):
    """I [b, Q, N] = sum_j w_j ReLU(q_j . k) (V4 eq. 16), fp32; iw carries both scales."""
    qk = jnp.einsum("bqjd,bnd->bqjn", iq, ik, preferred_element_type=jnp.float32)
    return jnp.einsum("bqj,bqjn->bqn", iw, jax.nn.relu(qk))


# Decode calls after the first carry at most this many tokens (speculative drafts): the rings keep
# that much more than they need, so positions a rejected draft wrote never displace needed ones.
DECODE_SLACK = 16


@flax.struct.dataclass
class HybridCache:
    """One layer's decode state (leading layer axes allowed), every slot tagged with its position
    (-1: empty), so a call may start anywhere (prompts of several lengths, rejected drafts):

    window / window_pos    the sliding window's keys, position p in slot p mod (W + slack)
    ring_*                 the compressor's (and the CSA indexer's) projections of recent tokens,
                           position p in slot p mod (2m + slack): what a window not yet closed needs
    entries / index_keys   the compressed entries, entry e covering positions e m .. e m + m - 1"""

    window: jax.Array  # [b, W + slack, d]
    window_pos: jax.Array  # [b, W + slack] int32
    ring_kv: jax.Array | None = None  # [b, 2m + slack, c d]
    ring_gate: jax.Array | None = None
    entries: jax.Array | None = None  # [b, T / m, d]
    index_ring_kv: jax.Array | None = None  # CSA: [b, 2m + slack, 2 dI]
    index_ring_gate: jax.Array | None = None
    index_keys: jax.Array | None = None  # CSA: [b, T / m, dI]

    @classmethod
    def zeros(cls, cfg: ModelConfig, layer_type: str, batch: int, max_len: int, lead=()):
        dt, d, m = jnp.dtype(cfg.dtype), cfg.head_dim, compress_rate(cfg, layer_type)

        def z(*shape, dtype=dt, fill=0):
            return jnp.full((*lead, batch, *shape), fill, dtype)

        w = cfg.sliding_window + DECODE_SLACK
        out = cls(window=z(w, d), window_pos=z(w, dtype=jnp.int32, fill=-1))
        if layer_type == SLIDING:
            return out
        r, c = 2 * m + DECODE_SLACK, 2 if layer_type == CSA else 1
        out = out.replace(ring_kv=z(r, c * d), ring_gate=z(r, c * d))
        out = out.replace(entries=z(max_len // m, d))
        if layer_type == CSA:
            di = cfg.index_head_dim
            out = out.replace(index_ring_kv=z(r, 2 * di), index_ring_gate=z(r, 2 * di), index_keys=z(max_len // m, di))
        return out


def first_live(positions):
    """Each row's first position and its index [b, 1] (positions -1 are padding; a call's live tokens
    are consecutive)."""
    i0 = jnp.argmax(positions >= 0, axis=1, keepdims=True)
    return jnp.take_along_axis(positions, i0, axis=1), i0


def ring_slots(positions, size: int):
    """Slot p mod size of each token (position -1: none; past the end, so dropped); of a call longer
    than the ring only its last positions get one (no two tokens share a slot)."""
    keep = (positions >= 0) & (positions > positions.max(-1, keepdims=True) - size)
    return jnp.where(keep, positions % size, size)


def scatter(buffer, slots, values):
    """buffer [b, n, ...] with values [b, k, ...] at slots [b, k] (out of range: dropped)."""
    return jax.vmap(lambda r, i, v: r.at[i].set(v.astype(r.dtype), mode="drop"))(buffer, slots, values)


class LightningIndexer(nn.Module):
    """CSA's indexer (V4 §2.3.1, eq. 13-17): queries from the query latent, keys from its own
    compressor at index_head_dim, head weights from the block input."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.wq_b = linear(c, (c.index_n_heads, c.index_head_dim), ("q_lora", "heads", None), "wq_b")
        self.weights_proj = linear(c, c.index_n_heads, ("embed", "heads"), "weights_proj", quantize=False)
        self.compressor = Compressor(c, c.index_head_dim, c.compress_rate_csa, True)

    def queries(self, x, q_latent, cos, sin):
        """(q [b, s, nI, dI] roped at the query positions, w [b, s, nI] fp32 times nI^-1/2 dI^-1/2)."""
        c = self.cfg
        q = rope_tail(self.wq_b(q_latent), cos, sin)
        w = self.weights_proj(x).astype(jnp.float32) * (c.index_n_heads**-0.5 * c.index_head_dim**-0.5)
        return q, w


class HybridAttention(nn.Module):
    cfg: ModelConfig
    layer_type: str

    def setup(self):
        c, h, d = self.cfg, self.cfg.num_attention_heads, self.cfg.head_dim
        pdt = jnp.dtype(c.param_dtype)
        self.wq_a = linear(c, c.q_lora_rank, ("embed", "q_lora"), "wq_a")
        self.q_norm = RMSNorm(c.rms_norm_eps, "norm", pdt)
        self.wq_b = linear(c, (h, d), ("q_lora", "heads", None), "wq_b")
        self.wkv = linear(c, d, ("embed", None), "wkv")
        self.kv_norm = RMSNorm(c.rms_norm_eps, "norm", pdt)
        g = c.o_groups
        init = nn.initializers.normal(c.initializer_range)
        self.wo_a = self.param(
            "wo_a", nn.with_logical_partitioning(init, ("heads", None, None)), (g, h // g * d, c.o_lora_rank), pdt
        )
        self.wo_b = linear(c, c.hidden_size, ("mlp", "embed"), "wo_b")
        self.attn_sink = self.param("attn_sink", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)), (h,))
        self.rate = compress_rate(c, self.layer_type)
        if self.layer_type != SLIDING:
            self.compressor = Compressor(c, d, self.rate, self.layer_type == CSA)
        if self.layer_type == CSA:
            self.indexer = LightningIndexer(c)

    def _qkv(self, x, cos, sin):
        c = self.cfg
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).astype(jnp.float32)
        q = (q * jax.lax.rsqrt(jnp.mean(q * q, axis=-1, keepdims=True) + c.rms_norm_eps)).astype(x.dtype)
        return q_latent, rope_tail(q, cos, sin), rope_tail(self.kv_norm(self.wkv(x)), cos, sin)

    def _output(self, o, cos, sin):
        """Un-rotate o's rope channels (RoPE at -t), then the grouped output projection."""
        c = self.cfg
        o = rope_tail(o, cos, -sin)
        b, s = o.shape[:2]
        grouped = jnp.einsum("bsgi,gio->bsgo", o.reshape(b, s, c.o_groups, -1), self.wo_a.astype(o.dtype))
        return self.wo_b(grouped.reshape(b, s, -1))

    def _entries(self, compressor, kv, gate, window, previous, has_previous, last, inv_freq):
        """Compressed entries (``compress``'s windows), roped at each window's first position
        (``last`` [b, n]: its last one) (V4: the entries' RoPE base is the compressed layers')."""
        cos, sin = angles(inv_freq, last - self.rate + 1)
        return rope_tail(compressor(kv, gate, window, previous, has_previous), cos, sin)

    def __call__(self, x, positions, segment_ids, cache: HybridCache | None = None):
        """x [b, s, H] (the collapsed, normed streams); positions, segment_ids [b, s] (0 = padding).
        Without a cache: a training forward (packed documents apart). With one: decoding at
        ``positions`` (each row contiguous), returns the updated cache. Returns (y [b, s, H], cache,
        the CSA indexer's KL per token [b, s] in training, else None). The indexer sees its inputs
        detached: the KL trains it alone, and the LM loss never reaches it (top-k has no gradient)."""
        c = self.cfg
        inv_freq = rope_frequencies(c, self.layer_type)
        cos, sin = angles(inv_freq, positions)
        q_latent, q, kv = self._qkv(x, cos, sin)
        kl = None
        if cache is None:
            o, kl = self._train_attention(x, q_latent, q, kv, positions, segment_ids, inv_freq, cos, sin)
        else:
            o, cache = self._decode_attention(x, q_latent, q, kv, positions, cache, inv_freq, cos, sin)
        return self._output(o, cos, sin), cache, kl

    def _train_attention(self, x, q_latent, q, kv, positions, segment_ids, inv_freq, cos, sin):
        c, (b, s) = self.cfg, positions.shape
        w, scale = c.sliding_window, c.head_dim**-0.5
        live = segment_ids > 0
        shared = {}
        if self.layer_type != SLIDING:
            ends = window_ends(positions, live, self.rate, max(s // self.rate, 1))
            last = jnp.where(ends >= 0, jnp.take_along_axis(positions, jnp.maximum(ends, 0), 1), -1)
            # a CSA window's predecessor is in the same document iff the window ends at position >= 2m - 1
            windows = (*windows_before(ends, self.rate), last >= 2 * self.rate - 1, last)
            shared["entries"] = self._entries(self.compressor, *self.compressor.project(x), *windows, inv_freq)
            shared["last"] = last
            shared["seg"] = jnp.where(ends >= 0, jnp.take_along_axis(segment_ids, jnp.maximum(ends, 0), 1), -1)
            if self.layer_type == CSA:
                ic = self.indexer.compressor
                xs = jax.lax.stop_gradient(x)
                shared["index_keys"] = self._entries(ic, *ic.project(xs), *windows, inv_freq)
        # blocks of W queries; block i's local keys: the W before it and its own W (front-padded by W)
        nb = -(-s // w)
        pad = nb * w - s

        def blocks(a, fill):
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
            return jnp.moveaxis(a.reshape(b, nb, w, *a.shape[2:]), 1, 0)  # [nb, b, w, ...]

        def keys(a, fill):  # [nb, b, 2w, ...]: previous block then own
            blk = blocks(a, fill)
            prev = jnp.concatenate([jnp.full_like(blk[:1], fill), blk[:-1]])
            return jnp.concatenate([prev, blk], axis=2)

        per_block = {"q": blocks(q, 0), "pos": blocks(positions, 0), "seg": blocks(segment_ids, -1)}
        per_block |= {"k": keys(kv, 0), "kpos": keys(positions, 0), "kseg": keys(segment_ids, -2)}
        if self.layer_type == CSA:
            iq, iw = self.indexer.queries(*jax.lax.stop_gradient((x, q_latent)), cos, sin)
            per_block |= {"iq": blocks(iq, 0), "iw": blocks(iw, 0)}

        def block(pb, sh):
            qp, qs = pb["pos"][..., :, None], pb["seg"][..., :, None]
            local = (pb["kseg"][:, None, :] == qs) & (pb["kpos"][:, None, :] <= qp) & (pb["kpos"][:, None, :] > qp - w)
            if not sh:
                return attend(pb["q"], pb["k"], local, self.attn_sink, scale)[0], jnp.zeros(pb["pos"].shape)
            comp = (sh["seg"][:, None, :] == qs) & (sh["last"][:, None, :] >= 0) & (sh["last"][:, None, :] <= qp)
            if self.layer_type == HCA:  # every visible entry
                keys_ = jnp.concatenate([pb["k"], sh["entries"]], axis=1)
                o, _ = attend(pb["q"], keys_, jnp.concatenate([local, comp], axis=-1), self.attn_sink, scale)
                return o, jnp.zeros(pb["pos"].shape)
            # CSA: the indexer's top k of the visible entries, gathered per query
            scores = jnp.where(comp, index_scores(pb["iq"], pb["iw"], sh["index_keys"]), -jnp.inf)
            idx, ok, top = select_entries(scores, c.index_topk)
            o, p = attend(pb["q"], pb["k"], local, self.attn_sink, scale, gather_slots(sh["entries"], idx), ok)
            return o, indexer_kl(p[..., 2 * w :], top, ok)

        # one block's scores live at a time, in the backward pass too (recomputed per block)
        o, kl = jax.lax.map(jax.checkpoint(lambda pb: block(pb, shared)), per_block)  # [nb, b, w, ...]
        unblock = lambda a: jnp.moveaxis(a, 0, 1).reshape(b, nb * w, *a.shape[3:])[:, :s]  # noqa: E731
        return unblock(o), (unblock(kl) if self.layer_type == CSA else None)

    def _decode_attention(self, x, q_latent, q, kv, positions, cache: HybridCache, inv_freq, cos, sin):
        """Each row's live tokens sit at consecutive positions (-1: padding, neither attending nor
        written)."""
        c = self.cfg
        w, scale = c.sliding_window, c.head_dim**-0.5
        p0, qp = first_live(positions)[0], positions[:, :, None]
        # sliding window: the ring's positions before this call, then the call's own tokens
        keys_ = jnp.concatenate([cache.window, kv.astype(cache.window.dtype)], axis=1)
        kpos = jnp.concatenate([jnp.where(cache.window_pos < p0, cache.window_pos, -1), positions], axis=1)
        visible = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qp) & (kpos[:, None, :] > qp - w)
        slots = ring_slots(positions, cache.window.shape[1])
        new = cache.replace(
            window=scatter(cache.window, slots, kv), window_pos=scatter(cache.window_pos, slots, positions)
        )
        if self.layer_type != SLIDING:
            windows = self._closing_windows(cache.ring_kv.shape[1], positions)
            entries, ring_kv, ring_gate = self._absorb(
                self.compressor, x, cache.entries, cache.ring_kv, cache.ring_gate, windows, positions, inv_freq
            )
            new = new.replace(entries=entries, ring_kv=ring_kv, ring_gate=ring_gate)
            last = (jnp.arange(entries.shape[1]) + 1) * self.rate - 1
            comp = (last <= qp) & (qp >= 0)
            if self.layer_type == CSA:  # the indexer's top k, gathered per query
                ic = self.indexer.compressor
                ikeys, iring_kv, iring_gate = self._absorb(
                    ic, x, cache.index_keys, cache.index_ring_kv, cache.index_ring_gate, windows, positions, inv_freq
                )
                new = new.replace(index_keys=ikeys, index_ring_kv=iring_kv, index_ring_gate=iring_gate)
                iq, iw = self.indexer.queries(x, q_latent, cos, sin)
                idx, ok, _ = select_entries(jnp.where(comp, index_scores(iq, iw, ikeys), -jnp.inf), c.index_topk)
                picked = gather_slots(entries, idx).astype(keys_.dtype)
                return attend(q, keys_, visible, self.attn_sink, scale, picked, ok)[0], new
            keys_ = jnp.concatenate([keys_, entries.astype(keys_.dtype)], axis=1)
            visible = jnp.concatenate([visible, comp], axis=-1)
        return attend(q, keys_, visible, self.attn_sink, scale)[0], new

    def _closing_windows(self, size: int, positions):
        """The windows this call's tokens close, as indices into [ring (``size`` slots) ; the call's
        tokens]: (window, previous, has_previous, last position [b, n]). A position before the call's
        first is read from its ring slot: the slack keeps it there (``DECODE_SLACK``)."""
        m, s = self.rate, positions.shape[1]
        p0, i0 = (a[..., None] for a in first_live(positions))
        ends = window_ends(positions, positions >= 0, m, s // m + 1)
        last = jnp.where(ends >= 0, jnp.take_along_axis(positions, jnp.maximum(ends, 0), 1), -1)

        def index(pos):
            return jnp.where(pos >= p0, size + i0 + pos - p0, jnp.maximum(pos, 0) % size)

        end = jnp.maximum(last, 0)[..., None]
        window, previous = index(end - jnp.arange(m - 1, -1, -1)), index(end - jnp.arange(2 * m - 1, m - 1, -1))
        return window, previous, last >= 2 * m - 1, last

    def _absorb(self, compressor, x, entries, ring_kv, ring_gate, windows, positions, inv_freq):
        """The new tokens through ``compressor``: an entry for each window they close, written at its
        index; the ring takes their projections."""
        window, previous, has_previous, last = windows
        kv, gate = compressor.project(x)
        all_kv = jnp.concatenate([ring_kv, kv.astype(ring_kv.dtype)], axis=1)
        all_gate = jnp.concatenate([ring_gate, gate.astype(ring_gate.dtype)], axis=1)
        fresh = self._entries(compressor, all_kv, all_gate, window, previous, has_previous, last, inv_freq)
        entries = scatter(entries, jnp.where(last >= 0, (last + 1) // self.rate - 1, entries.shape[1]), fresh)
        slots = ring_slots(positions, ring_kv.shape[1])
        return entries, scatter(ring_kv, slots, kv), scatter(ring_gate, slots, gate)
