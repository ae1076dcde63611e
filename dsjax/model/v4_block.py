"""DeepSeek-V4's decoder block and the stack of them (V4 report §2).

    u = collapse(X; pre_attn);   X <- post_attn Attn(attn_norm(u)) + comb_attn^T X       (mHC, §2.2)
    u = collapse(X; pre_ffn);    X <- post_ffn  MoE(ffn_norm(u))   + comb_ffn^T X

X is the [B, S, hc_mult, D] residual streams; Attn is the layer type's attention
(``hybrid_attention``), MoE hash- or learned-routed per ``mlp_layer_types``. Layers differ in their
parameters by (layer type, MLP type), so the stack cannot scan one block over every layer as V3's
does: ``layer_plan`` cuts it into runs where a pattern of 1 or 2 kinds repeats (V4-Flash: two
sliding hash layers, one CSA hash layer, then 20 x (HCA, CSA)), and each run of r > 1 repeats is one
``nn.scan`` of a group of blocks (compile time independent of depth). Hub names: ``layers.N.*``
(``attn_norm``, ``ffn_norm``, ``hc_attn_*``, ``hc_ffn_*``, ``attn.*``, ``ffn.*``).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.block import REMAT_POLICIES
from dsjax.model.hybrid_attention import HybridAttention
from dsjax.model.hyper_connection import HyperConnection, expand
from dsjax.model.layers import RMSNorm
from dsjax.model.moe import BIAS, MoE


class Run(NamedTuple):
    """Layers start .. start + len(kinds) * repeats - 1: the pattern ``kinds`` (layer type, MLP type)
    repeated; one module, ``name``, holding a group of len(kinds) blocks, scanned when repeats > 1."""

    name: str
    start: int
    kinds: tuple[tuple[str, str], ...]
    repeats: int

    def layers(self):
        """(global layer index, repeat, offset in the group) of every layer of the run."""
        p = len(self.kinds)
        return [(self.start + r * p + o, r, o) for r in range(self.repeats) for o in range(p)]


def layer_plan(cfg: ModelConfig) -> list[Run]:
    """The stack's runs. Unscanned (``scan_layers`` false): one run per layer, ``layer_N``. Else
    greedily the longest repetition of a 1- or 2-kind pattern from each point, ``run_J``."""
    kinds = list(zip(cfg.layer_types, cfg.mlp_layer_types, strict=True))
    if not cfg.scan_layers:
        return [Run(f"layer_{i}", i, (k,), 1) for i, k in enumerate(kinds)]
    runs, i = [], 0
    while i < len(kinds):
        best = (1, 1)
        for period in (1, 2):
            pattern, r = kinds[i : i + period], 1
            while kinds[i + r * period : i + (r + 1) * period] == pattern:
                r += 1
            if len(pattern) == period and r > 1 and period * r > best[0] * best[1]:
                best = (period, r)
        period, r = best
        runs.append(Run(f"run_{len(runs)}", i, tuple(kinds[i : i + period]), r))
        i += period * r
    return runs


class V4Block(nn.Module):
    cfg: ModelConfig
    layer_type: str
    mlp_type: str

    @nn.compact
    def __call__(self, x, tokens, positions, segment_ids, token_mask, cache=None, routes=None):
        """x [B, S, n, D] streams. Returns (x, (RouterStats, cache, the CSA indexer's KL [B, S] or None))."""
        c, pdt = self.cfg, jnp.dtype(self.cfg.param_dtype)
        u, post, comb = HyperConnection(c, name="hc_attn")(x)
        y, cache, kl = HybridAttention(c, self.layer_type, name="attn")(
            RMSNorm(c.rms_norm_eps, "norm", pdt, name="attn_norm")(u), positions, segment_ids, cache
        )
        x = expand(x, y, post, comb)
        u, post, comb = HyperConnection(c, name="hc_ffn")(x)
        y, stats = MoE(c, self.mlp_type == "hash_moe", name="ffn")(
            RMSNorm(c.rms_norm_eps, "norm", pdt, name="ffn_norm")(u), token_mask, routes, tokens=tokens
        )
        return expand(x, y, post, comb), (stats, cache, kl)


class V4Group(nn.Module):
    """One repeat of a run's pattern: its blocks in order, ``block_0`` ...; fits ``nn.scan``."""

    cfg: ModelConfig
    kinds: tuple[tuple[str, str], ...]

    @nn.compact
    def __call__(self, x, tokens, positions, segment_ids, token_mask, caches=None, routes=None):
        block = V4Block
        if self.cfg.remat != "none":
            block = nn.remat(V4Block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        outs = []
        for o, (layer_type, mlp_type) in enumerate(self.kinds):
            cache = None if caches is None else caches[o]
            route = None if routes is None else routes[o]
            x, out = block(self.cfg, layer_type, mlp_type, name=f"block_{o}")(
                x, tokens, positions, segment_ids, token_mask, cache, route
            )
            outs.append(out)
        stats, caches_out, kls = zip(*outs, strict=True)
        return x, (stats, None if caches is None else caches_out, kls)


class V4Stack(nn.Module):
    """Every decoder layer, run by run (``layer_plan``). Caches and routes come per run: a tuple
    over the group's blocks, each with a leading repeat axis when the run is scanned."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, tokens, positions, segment_ids, token_mask, caches=None, routes=None):
        """Returns (x, RouterStats stacked over the layers [L, ...], caches by run name or None, the CSA
        layers' indexer KL per token summed [B, S] (None without CSA layers or with caches)).
        ``routes`` [L, B, S, K]: routing replay in the learned-routing layers (-1: free)."""
        per_layer, new_caches, kl = {}, {}, None
        for run in layer_plan(self.cfg):
            cache = None if caches is None else caches[run.name]
            route = None
            if routes is not None:
                route = tuple(
                    jnp.stack([routes[i] for i, _, o2 in run.layers() if o2 == o]) for o in range(len(run.kinds))
                )
            if run.repeats == 1:
                route = None if route is None else tuple(r[0] for r in route)
                x, (stats, cache, kls) = V4Group(self.cfg, run.kinds, name=run.name)(
                    x, tokens, positions, segment_ids, token_mask, cache, route
                )
                stats = [jax.tree.map(lambda a: a[None], st) for st in stats]
                kls = [None if k is None else k[None] for k in kls]
            else:
                scanned = nn.scan(
                    V4Group,
                    variable_axes={"params": 0, BIAS: 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast,) * 4 + (0, 0),
                    length=run.repeats,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                x, (stats, cache, kls) = scanned(self.cfg, run.kinds, name=run.name)(
                    x, tokens, positions, segment_ids, token_mask, cache, route
                )
            for i, r, o in run.layers():
                per_layer[i] = jax.tree.map(lambda a, r=r: a[r], stats[o])
            new_caches[run.name] = cache
            for k in kls:
                if k is not None:
                    kl = k.sum(0) if kl is None else kl + k.sum(0)
        stats = jax.tree.map(lambda *a: jnp.stack(a), *(per_layer[i] for i in range(len(per_layer))))
        return x, stats, (None if caches is None else new_caches), kl
