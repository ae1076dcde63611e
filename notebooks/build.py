"""Writes the notebooks in this folder from the cell sources below, and runs them.

    python notebooks/build.py                  # (re)write every .ipynb, without outputs
    python notebooks/build.py --run 02 03      # write + execute those (full mode), keeping the outputs
    QUICK=1 python notebooks/build.py --run 01 # the same in QUICK mode (what CI does, via pytest)

The .ipynb files are generated: edit the sources here, so that diffs stay reviewable. The committed
notebooks carry the outputs of a full (non-QUICK) run on CPU; ``tests/test_notebooks.py`` checks
that they match these sources and executes each one in QUICK mode.

Every notebook uses only the public API (``dsjax``, ``bench``), reads ``QUICK`` from the
environment in its first code cell (CI sets QUICK=1: small sizes, a few steps, well under a minute
or two per notebook) and prints every number its conclusion states.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os, sys, json, math, shutil, time, pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the figures here are CPU measurements
QUICK = os.environ.get("QUICK", "0") == "1"  # CI sets QUICK=1: small sizes and few steps, same code
if QUICK:  # a smoke run: compile fast (XLA spends less time optimising; its timings mean nothing)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
ROOT = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "train.py").is_file())
os.chdir(ROOT)  # configs/ and runs/ are relative to the repository root
sys.path.insert(0, str(ROOT))  # bench/ lives there (dsjax itself is installed)
RUNS = ROOT / "runs" / "notebooks" / "{name}" / ("quick" if QUICK else "full")  # runs/ is git-ignored

import jax
import numpy as np
import matplotlib.pyplot as plt

from IPython.display import display

%matplotlib inline
plt.rcParams.update({{"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3}})


def show(fig):
    """Displays fig whatever matplotlib backend is active, then closes it."""
    display(fig)
    plt.close(fig)


print(f"QUICK={{QUICK}}, JAX {{jax.__version__}} on {{jax.default_backend()}}, {{os.cpu_count()}} CPU cores")'''


def md(text: str) -> tuple[str, str]:
    return "markdown", textwrap.dedent(text).strip("\n")


def code(text: str) -> tuple[str, str]:
    return "code", textwrap.dedent(text).strip("\n")


def setup(name: str) -> tuple[str, str]:
    return "code", SETUP.format(name=name)


# ---------------------------------------------------------------------------------------------
# 01: MLA's KV cache

NB01 = [
    md("""
    # 01 · MLA: a smaller KV cache, and faster decoding at long context

    Multi-head latent attention (DeepSeek-V2 §2.1) caches, per token and layer, only the
    normalised latent `c_kv` (`kv_lora_rank` = 512 values at V3 dims) and one roped key `k_pe`
    shared by all heads (`qk_rope_head_dim` = 64): 576 values. Standard attention caches keys and
    values per KV head: MHA one per query head, GQA one per group, MQA one in total. At decode time
    dsjax attends in *absorbed* form (`W_UK` folded into the query, `W_UV` applied after attention),
    so the expanded per-head keys and values are never built.

    This notebook
    1. measures cache bytes per token for MHA, GQA (8 groups), MQA and MLA at DeepSeek-V3 dims,
       from real cache arrays (MLA: `dsjax.model.init_cache`, the cache `generate` decodes from);
    2. times one MLA layer's decode step against context length, reading the latent cache
       (absorbed) vs an expanded per-head K/V cache (`bench/decode.py`).
    """),
    setup("01_mla_kv_cache"),
    md("""
    ## 1. Cache bytes per token at V3 dims

    V3: 61 layers, 128 heads, keys of `qk_nope + qk_rope` = 192 and values of 128 per head, bf16.
    For MHA / GQA / MQA we allocate the usual `[layers, batch, tokens, kv_heads, head_dim]` key and
    value arrays with V3's head dims; for MLA the cache `init_cache` builds for the V3 config.
    Bytes per token = total bytes of the arrays / tokens.
    """),
    code('''
    import jax.numpy as jnp
    from dsjax.config import load_config
    from dsjax.model import init_cache

    v3 = load_config("configs/deepseek_v3_671b.yaml").model
    T = 16  # cache slots allocated (bytes per token do not depend on it)
    L, H, dk, dv, dt = v3.num_hidden_layers, v3.num_attention_heads, v3.qk_head_dim, v3.v_head_dim, jnp.dtype(v3.dtype)


    def kv_cache(kv_heads):
        """A standard K/V cache: per layer and token, kv_heads keys (dk) and values (dv)."""
        return {"k": jnp.zeros((L, 1, T, kv_heads, dk), dt), "v": jnp.zeros((L, 1, T, kv_heads, dv), dt)}


    caches = {
        f"MHA ({H} KV heads)": kv_cache(H),
        "GQA (8 groups)": kv_cache(8),
        "MQA (1 KV head)": kv_cache(1),
        "MLA (latent, dsjax)": init_cache(v3, batch=1, max_len=T),
    }
    print("MLA cache arrays:", {k: (type(c).__name__, {f: (a.shape, str(a.dtype)) for f, a in vars(c).items() if a is not None})
                                for k, c in caches["MLA (latent, dsjax)"].items()})
    per_token = {k: sum(a.nbytes for a in jax.tree.leaves(c)) / T for k, c in caches.items()}
    del caches
    mha = per_token[f"MHA ({H} KV heads)"]
    CONTEXT = 128 * 1024
    print(f"\\n{'':22s}{'values/token/layer':>20s}{'KiB/token':>12s}{'vs MHA':>9s}{'GiB at 128K ctx':>17s}")
    for k, b in per_token.items():
        print(f"{k:22s}{b / L / dt.itemsize:20.0f}{b / 1024:12.1f}{b / mha:9.2%}{b * CONTEXT / 2**30:17.2f}")
    '''),
    code("""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(per_token)
    ax.barh(names[::-1], [per_token[n] / 1024 for n in names[::-1]], color=["C3", "C1", "C0", "C2"][::-1])
    ax.set_xscale("log")
    ax.set_xlabel("KV cache KiB per token (61 layers, bf16, log scale)")
    for i, n in enumerate(names[::-1]):
        ax.text(per_token[n] / 1024 * 1.1, i, f"{per_token[n] / 1024:.0f} KiB", va="center")
    ax.set_xlim(right=max(per_token.values()) / 1024 * 8)
    ax.set_title("DeepSeek-V3 dims: cache per token")
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## 2. Decode time vs context: absorbed (latent cache) vs expanded cache

    One MLA layer's decode step for one token (projections, cache write, attention, `o_proj`), batch
    1, over a cache holding `context` tokens, with `bench.decode`'s CPU-sized V3-shaped config
    (V3 dims would not fit a CPU at long context): 16 heads, latent 256 + 32, expanded per head
    96 + 64. `layer_decode` times the model's absorbed path (`mla_attention_absorbed` over
    `LatentCache`) and the same layer reading an expanded per-head K/V cache, best of several
    repeats after compilation.
    """),
    code("""
    from bench.decode import bench_config, layer_decode
    from dsjax.model import random_variables

    small = bench_config()
    attn = jax.tree.map(lambda w: w[0], random_variables(small)["params"]["moe_layers"]["layers"]["self_attn"])
    contexts = [256, 1024] if QUICK else [512, 1024, 2048, 4096, 8192, 16384]
    repeats = 3 if QUICK else 10
    rows = []
    for ctx in contexts:
        r = layer_decode(small, attn, ctx, repeats)
        rows.append({"context": ctx, **r})
        print(f"context {ctx:6d}: latent {r['latent_ms']:8.3f} ms, expanded {r['expanded_ms']:8.3f} ms, "
              f"ratio {r['latent_ms'] / r['expanded_ms']:.3f}  (cache {r['latent_bytes']:.0f} vs {r['expanded_bytes']:.0f} B/token)")
    """),
    code("""
    ctx = np.array([r["context"] for r in rows])
    lat, exp_ = np.array([r["latent_ms"] for r in rows]), np.array([r["expanded_ms"] for r in rows])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    a1.loglog(ctx, lat, "o-", label="absorbed, latent cache")
    a1.loglog(ctx, exp_, "s-", label="expanded per-head K/V cache")
    a1.set(xlabel="context (tokens in the cache)", ylabel="ms per decode step (one layer)", title="decode step time")
    a1.legend()
    a2.semilogx(ctx, lat / exp_, "o-", color="C2")
    a2.axhline(1, color="k", lw=0.8)
    a2.set(xlabel="context", ylabel="latent / expanded time", title="time ratio (< 1: absorbed faster)")
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## Conclusion

    The numbers below are computed from the measurements above (nothing is typed in by hand).
    """),
    code("""
    mla, gqa, mqa = per_token["MLA (latent, dsjax)"], per_token["GQA (8 groups)"], per_token["MQA (1 KV head)"]
    print(f"KV cache per token at V3 dims (61 layers, bf16): MHA {mha / 1024:.0f} KiB, GQA-8 {gqa / 1024:.0f} KiB, "
          f"MQA {mqa / 1024:.1f} KiB, MLA {mla / 1024:.1f} KiB.")
    print(f"MLA caches {mla / mha:.2%} of MHA's bytes ({mha / mla:.0f}x less), {mla / gqa:.1%} of GQA-8's, "
          f"{mla / mqa:.2f}x MQA's; a 128K-token context needs {mla * CONTEXT / 2**30:.1f} GiB instead of "
          f"{mha * CONTEXT / 2**30:.0f} GiB (MHA).")
    ratio = lat / exp_
    best = int(np.argmin(ratio))
    faster = [int(c) for c, r in zip(ctx, ratio) if r < 1]
    print(f"Decoding (one layer, CPU, {small.num_attention_heads} heads): absorbed / expanded time = "
          + ", ".join(f"{r:.2f} at {c}" for c, r in zip(ctx, ratio)) + ".")
    if faster:
        print(f"The absorbed path is faster from context {faster[0]} on (in {len(faster)} of {len(ctx)} contexts), "
              f"at best {1 / ratio[best]:.1f}x faster (context {ctx[best]}), while reading "
              f"{rows[0]['latent_bytes'] / rows[0]['expanded_bytes']:.1%} of the expanded cache's bytes per token.")
    else:
        print("The absorbed path was not faster at any measured context on this machine.")
    """),
    md("""
    Why: the absorbed form does more arithmetic per cached token (scores against a 256 + 32 wide
    latent per head instead of 96 + 64) but reads far fewer bytes, so it wins once the expanded
    cache no longer fits the CPU caches. At V3 dims the byte ratio is the table's MLA / MHA figure.
    """),
]

# ---------------------------------------------------------------------------------------------
# 02: load balancing

NB02 = [
    md("""
    # 02 · Auxiliary-loss-free load balancing

    DeepSeek-V3 keeps its experts evenly loaded mostly without an auxiliary loss: each MoE layer adds
    a per-expert bias `b` to the routing scores *for the top-k selection only* (the gate weights stay
    unbiased), and after every step moves it by `gamma * sign(mean load - load)`. A tiny
    sequence-wise balance loss (`alpha` = 1e-4) guards against extreme imbalance within a sequence.
    The V3 report (Table 5) finds this balances experts and gives better validation loss and
    benchmarks than a conventional auxiliary loss.

    We train the same tiny MoE (`configs/tiny.yaml`: 3 MoE layers of 8 routed experts, top-2, 1 shared;
    1 MTP module) on the same tokens three ways:

    | run | `train.balance_loss_alpha` | `train.bias_update_rate` (gamma) |
    |---|---|---|
    | (a) no balancing | 0 | 0 |
    | (b) auxiliary loss only | 0.01 | 0 |
    | (c) aux-loss-free bias + small sequence loss (V3) | 1e-4 | 1e-3 |

    For (b) we use dsjax's sequence-wise balance loss with a conventional auxiliary-loss weight
    (0.01; DeepSeek-V2 used 0.003 for its expert-level loss) as a stand-in for an auxiliary-loss-based
    baseline: it is the same `f_i * P_i` form, computed per sequence instead of per batch.

    The training loop is `dsjax.train`'s, written out with its step functions so that we can also read each
    MoE layer's expert loads (token counts per expert, from `Transformer.apply(...).router`) on the
    batch every few steps.
    """),
    setup("02_load_balancing"),
    code("""
    import jax.numpy as jnp
    from dsjax.config import load_config
    from dsjax.model import Transformer, count_params
    from dsjax.train import evaluate, init_state, make_eval_step, make_train_step
    from dsjax.train.data import eval_batches, load_splits, make_tokenizer, train_batches

    SIZE = (["model.num_hidden_layers=3", "model.hidden_size=64", "model.num_nextn_predict_layers=0", "train.seq_len=64",
             "train.batch_size=4", "train.steps=8", "train.warmup_steps=2", "train.decay_steps=6", "train.eval_batches=1"] if QUICK
            else ["train.batch_size=8", "train.steps=200", "train.decay_steps=180", "train.eval_batches=16"])
    LOAD_EVERY = 1 if QUICK else 5  # expert loads recorded every this many steps
    VARIANTS = {
        "(a) no balancing": ["train.balance_loss_alpha=0", "train.bias_update_rate=0"],
        "(b) aux loss only": ["train.balance_loss_alpha=0.01", "train.bias_update_rate=0"],
        "(c) aux-loss-free": ["train.balance_loss_alpha=1e-4", "train.bias_update_rate=1e-3"],
    }
    cfgs = {k: load_config("configs/tiny.yaml", SIZE + v) for k, v in VARIANTS.items()}
    base = cfgs["(a) no balancing"]
    assert all(c.model == base.model for c in cfgs.values())  # the same model; only the loss / bias differ
    tokenizer = make_tokenizer(base.data)
    train_split, val_split = load_splits(base.data, base.train.seq_len, tokenizer)
    val = eval_batches(val_split, base.train.batch_size, base.train.eval_batches)
    model = Transformer(base.model)
    eval_fn = jax.jit(make_eval_step(base, model))
    state0 = jax.jit(lambda: init_state(base, model, jax.random.key(base.train.seed)))()  # the same start for every run
    loads_fn = jax.jit(lambda params, bias, b: model.apply(
        {"params": params, "selection_bias": bias}, b["tokens"], b["segment_ids"], b["positions"]).router.expert_counts)
    n = count_params(base.model)
    t = base.train
    print(f"{n['total']:,} parameters ({n['activated']:,} activated), {base.model.num_moe_layers} MoE layers x "
          f"{base.model.n_routed_experts} experts (top-{base.model.num_experts_per_tok}); "
          f"{t.steps} steps x {t.batch_size} x {t.seq_len} tokens per run")
    """),
    code('''
    def run(cfg):
        """dsjax.train's loop (same init, batches, step) + expert loads per MoE layer every LOAD_EVERY steps."""
        state = jax.tree.map(jnp.copy, state0)  # the step donates (consumes) its input state
        step_fn = jax.jit(make_train_step(cfg, model), donate_argnums=0)
        batches = train_batches(train_split, cfg.train.batch_size, cfg.train.seed)
        h = {"ce": [], "balance": [], "load_max_mean": [], "load_steps": [], "loads": []}
        t0 = time.perf_counter()
        for step in range(1, cfg.train.steps + 1):
            batch = next(batches)
            if step == 1 or step % LOAD_EVERY == 0:  # the loads this step's bias update sees
                h["load_steps"].append(step)
                h["loads"].append(np.asarray(loads_fn(state.params, state.bias, batch)))  # [MoE layers, experts]
            state, m = step_fn(state, batch)
            m = jax.device_get(m)
            for k in ("ce", "balance", "load_max_mean"):
                h[k].append(float(m[k]))
        h["seconds"] = time.perf_counter() - t0
        h["loads"] = np.stack(h["loads"])  # [points, layers, experts]
        h.update(evaluate(eval_fn, state, val, val_split.bytes_per_token))
        return h


    results = {}
    for name, cfg in cfgs.items():
        results[name] = r = run(cfg)
        print(f"{name:20s} {r['seconds']:6.1f} s: final train CE {r['ce'][-1]:.3f}, load max/mean {r['load_max_mean'][-1]:.2f}, "
              f"validation {r['val_loss']:.4f} nats/token = {r['val_bpb']:.4f} bits/byte")
    '''),
    md("""
    ## Expert load over training, per layer

    Each panel: one MoE layer of one run; rows are experts, columns training steps, colour = the
    expert's share of the layer's token assignments relative to an even split (1 = balanced,
    0 = idle, >= 3 = overloaded).
    """),
    code("""
    layers = base.model.num_moe_layers
    fig, axes = plt.subplots(len(results), layers, figsize=(3.8 * layers + 1, 2.3 * len(results)), squeeze=False)
    for i, (name, r) in enumerate(results.items()):
        rel = r["loads"] / r["loads"].mean(-1, keepdims=True)
        for l in range(layers):
            ax = axes[i, l]
            im = ax.imshow(rel[:, l, :].T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=3,
                           extent=(r["load_steps"][0], r["load_steps"][-1], -0.5, rel.shape[-1] - 0.5), interpolation="nearest")
            ax.grid(False)
            ax.set_title(f"{name}, MoE layer {l + base.model.first_k_dense_replace}", fontsize=9)
            ax.set(xlabel="step" if i == len(results) - 1 else None, ylabel="expert" if l == 0 else None)
    fig.colorbar(im, ax=axes, shrink=0.8, label="load / mean load")
    show(fig)
    """),
    code("""
    def smooth(x, w):
        x = np.asarray(x)
        w = max(1, min(w, len(x)))
        return np.convolve(x, np.ones(w) / w, mode="valid")


    W = 1 if QUICK else 10
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, r in results.items():
        steps = np.arange(1, len(r["ce"]) + 1)[W - 1:]
        a1.plot(steps, smooth(r["load_max_mean"], W), label=name)
        a2.plot(steps, smooth(r["ce"], W), label=name)
    a1.axhline(1, color="k", lw=0.8)
    a1.set(xlabel="step", ylabel="max / mean expert load", title=f"load imbalance (mean over MoE layers, {W}-step avg)")
    a2.set(xlabel="step", ylabel="nats / token", title="training next-token loss")
    a1.legend(); a2.legend()
    if not QUICK:
        a2.set_ylim(top=float(np.percentile(results["(a) no balancing"]["ce"], 90)))
    names = list(results)
    bpb = [results[k]["val_bpb"] for k in names]
    a3.bar(range(len(names)), bpb, color=["C0", "C1", "C2"])
    a3.set_xticks(range(len(names)), names, fontsize=8)
    a3.set_ylim(min(bpb) - 0.1, max(bpb) + 0.05)
    for i, v in enumerate(bpb):
        a3.text(i, v + 0.005, f"{v:.3f}", ha="center")
    a3.set(ylabel="bits per byte", title="final validation")
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## Conclusion

    Printed from the runs above. "Late" is the last 20% of training steps. One seed per run: at
    this scale, differences of a few thousandths of a bit per byte are within run-to-run noise.
    """),
    code("""
    late = max(1, len(results["(a) no balancing"]["ce"]) // 5)
    s = {k: {"load": float(np.mean(r["load_max_mean"][-late:])), "worst": float(np.max(r["loads"][-max(1, late // LOAD_EVERY):] /
             r["loads"][-max(1, late // LOAD_EVERY):].mean(-1, keepdims=True))), "bpb": r["val_bpb"]} for k, r in results.items()}
    for k, v in s.items():
        print(f"{k:20s} late load max/mean {v['load']:.2f} (worst expert {v['worst']:.2f}x its share), "
              f"validation {v['bpb']:.4f} bits/byte")
    a, b, c = s["(a) no balancing"], s["(b) aux loss only"], s["(c) aux-loss-free"]
    print()
    print(f"Balance: the bias (c) brings load max/mean from {a['load']:.2f} (no balancing) to {c['load']:.2f}; "
          f"the auxiliary loss (b) to {b['load']:.2f}: (c) is {'more' if c['load'] < b['load'] else 'less'} balanced than (b).")
    print(f"Quality: (c) - (a) = {c['bpb'] - a['bpb']:+.4f} bits/byte, (c) - (b) = {c['bpb'] - b['bpb']:+.4f} "
          f"(negative: (c) better), (b) - (a) = {b['bpb'] - a['bpb']:+.4f}.")
    claim_balance = c["load"] < a["load"]
    claim_quality = c["bpb"] <= a["bpb"] + 0.01
    claim_beats_b = c["bpb"] < b["bpb"]
    print(f"DeepSeek's claims at this scale: (c) balances the experts: {'yes' if claim_balance else 'no'}; "
          f"at no quality cost (within 0.01 bit/byte of no balancing): {'yes' if claim_quality else 'no'}; "
          f"better validation than the auxiliary loss (b): {'yes' if claim_beats_b else 'no'}.")
    """),
]

# ---------------------------------------------------------------------------------------------
# 03: MTP

NB03 = [
    md("""
    # 03 · Multi-token prediction (MTP)

    DeepSeek-V3 trains one MTP module (D = 1) next to the main model: at position i it combines the
    main model's hidden state with the embedding of token i+1 and predicts token i+2, with the
    embedding and output head shared. The extra loss (weight lambda = 0.3 here) densifies the
    training signal; at inference the module can be dropped, or used to *draft* the next token for
    speculative decoding (V3 reports 85-90% acceptance of the second token and 1.8x tokens per
    second).

    We train the same tiny model (`configs/tiny.yaml`) with and without the MTP module on the same
    tokens, with `dsjax.train.train`, then compare
    1. the **main head's** validation loss (MTP should not hurt it, and may help);
    2. the MTP module's **draft acceptance rate** in `generate(..., speculative=True)`;
    3. the **speed-up** of speculative over plain decoding (greedy output is identical).
    """),
    setup("03_mtp"),
    code("""
    from dsjax.config import load_config
    from dsjax.model import count_params
    from dsjax.train import train

    SIZE = (["model.num_hidden_layers=3", "model.hidden_size=64", "train.seq_len=64", "train.batch_size=4",
             "train.steps=8", "train.warmup_steps=2", "train.decay_steps=6", "train.eval_every=4", "train.eval_batches=1"] if QUICK
            else ["train.batch_size=8", "train.steps=200", "train.decay_steps=180", "train.eval_every=50", "train.eval_batches=16"])
    COMMON = SIZE + [f"train.output_dir={RUNS}", "train.sample_tokens=0", "train.checkpoint_every=100000", "train.log_every=1"]
    RUN_OVERRIDES = {"no MTP": ["model.num_nextn_predict_layers=0", "train.run_name=no_mtp"],
                     "MTP (D=1)": ["model.num_nextn_predict_layers=1", "train.mtp_loss_weight=0.3", "train.run_name=mtp"]}
    shutil.rmtree(RUNS, ignore_errors=True)
    metrics, last, cfgs = {}, {}, {}
    for name, ov in RUN_OVERRIDES.items():
        cfgs[name] = cfg = load_config("configs/tiny.yaml", COMMON + ov)
        t0 = time.perf_counter()
        last[name] = train(cfg, progress=False)
        last[name]["seconds"] = time.perf_counter() - t0
        metrics[name] = [json.loads(l) for l in (RUNS / cfg.train.run_name / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["tokens_per_s"] for r in metrics[name] if "tokens_per_s" in r][1:]  # step 1 includes compilation
        last[name]["tokens_per_s_median"] = float(np.median(speeds)) if speeds else last[name]["tokens_per_s"]
        n = count_params(cfg.model)
        print(f"  {name}: main model {n['main']:,} + MTP {n['mtp']:,} parameters; {last[name]['seconds']:.0f} s; "
              f"validation (main head) {last[name]['val_loss']:.4f} nats/token, {last[name]['val_bpb']:.4f} bits/byte")
    """),
    code("""
    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return np.array(pts).T if pts else np.zeros((2, 0))


    W = 1 if QUICK else 10
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8))
    for i, (name, rows) in enumerate(metrics.items()):
        s, ce = series(rows, "ce")
        k = min(W, len(ce))
        a1.plot(s[k - 1:], np.convolve(ce, np.ones(k) / k, "valid"), color=f"C{i}", alpha=0.6, label=f"{name}: train, main head")
        a2.plot(*series(rows, "val_loss"), "o-", color=f"C{i}", label=f"{name}: validation, main head")
    s, mtp = series(metrics["MTP (D=1)"], "mtp")
    k = min(W, len(mtp))
    a1.plot(s[k - 1:], np.convolve(mtp, np.ones(k) / k, "valid"), color="C1", ls="--", label="MTP (D=1): train, MTP head (t+2)")
    a1.set(xlabel="step", ylabel="nats / token", title=f"training loss ({W}-step avg)")
    if not QUICK:
        a1.set_ylim(top=3.5)
    a2.set(xlabel="step", ylabel="nats / token", title="validation loss of the main head")
    a1.legend(); a2.legend()
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## Speculative decoding with the trained MTP module

    Prompts are the first tokens of validation windows (held-out files). Plain greedy decoding and
    speculative greedy decoding must produce the same tokens (checked); `stats` gives the fraction
    of drafts accepted and the decode time; we average both over 3 warm runs per prompt (batch 1),
    each run with its own sampling key.
    With sampling (temperature 0.8, top-k 20) the output follows the main model's distribution, so
    acceptance is lower.
    """),
    code('''
    from dsjax.infer import generate
    from dsjax.train import restore_model
    from dsjax.train.data import load_splits, make_tokenizer

    mcfg, variables = restore_model(RUNS / "mtp")
    dcfg = cfgs["MTP (D=1)"]
    tokenizer = make_tokenizer(dcfg.data)
    _, val_split = load_splits(dcfg.data, dcfg.train.seq_len, tokenizer)
    PROMPT, NEW, N_PROMPTS, REPEATS = (16, 8, 1, 1) if QUICK else (32, 128, 6, 3)
    prompts = [[int(t) for t in val_split[i * (len(val_split) // N_PROMPTS)]["tokens"][:PROMPT]] for i in range(N_PROMPTS)]


    def runs(n, speculative, sampling):
        """n warm runs per prompt, each with its own key (generate consumes its rng)."""
        return [generate(mcfg, variables, [p], NEW, speculative=speculative, **sampling, rng=jax.random.key(i))
                for p in prompts for i in range(n)]


    tps = lambda gs: sum(g.stats["new_tokens"] - 1 for g in gs) / sum(g.stats["decode_s"] for g in gs)  # over all runs
    spec_results, outputs = {}, {}
    for mode, sampling in {"greedy": {}, "sampled (T=0.8, top-k 20)": dict(temperature=0.8, top_k=20)}.items():
        if not QUICK:
            for speculative in (False, True):
                runs(1, speculative, sampling)  # compile (QUICK: timings are not the point)
        plain, spec = runs(REPEATS, False, sampling), runs(REPEATS, True, sampling)
        outputs[mode] = spec
        if mode == "greedy":
            assert all((p.tokens == s.tokens).all() for p, s in zip(plain, spec)), "speculative greedy != greedy"
        spec_results[mode] = r = dict(
            acceptance=float(np.mean([g.stats["acceptance"] for g in spec])),
            tokens_per_step=float(np.mean([g.stats["tokens_per_step"] for g in spec])),
            plain_tps=tps(plain), spec_tps=tps(spec))
        print(f"{mode:26s} acceptance {r['acceptance']:.1%}, {r['tokens_per_step']:.2f} tokens/step, "
              f"plain {r['plain_tps']:.0f} tok/s, speculative {r['spec_tps']:.0f} tok/s, speed-up {r['spec_tps'] / r['plain_tps']:.2f}x")
    g = outputs["greedy"][0]
    print("greedy sample:", repr(tokenizer.decode(prompts[0]) + " >>> " + tokenizer.decode(g.tokens[0, : g.lengths[0]])))
    '''),
    code("""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.3))
    modes = list(spec_results)
    a1.bar(modes, [spec_results[m]["acceptance"] for m in modes], color="C2")
    a1.set(ylim=(0, 1), ylabel="draft acceptance", title="MTP drafts accepted")
    x = np.arange(len(modes))
    a2.bar(x - 0.2, [spec_results[m]["plain_tps"] for m in modes], 0.4, label="plain")
    a2.bar(x + 0.2, [spec_results[m]["spec_tps"] for m in modes], 0.4, label="speculative (MTP)")
    a2.set_xticks(x, modes)
    a2.set(ylabel="decode tokens / s (batch 1, CPU)", title="decoding speed")
    a2.legend()
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## Conclusion

    Printed from the runs above (one seed each; at this scale a few thousandths of a bit per byte
    are within run-to-run noise).
    """),
    code("""
    a, b = last["no MTP"], last["MTP (D=1)"]
    d = b["val_bpb"] - a["val_bpb"]
    print(f"Main-head validation: no MTP {a['val_loss']:.4f} nats/token ({a['val_bpb']:.4f} bits/byte), "
          f"with MTP {b['val_loss']:.4f} ({b['val_bpb']:.4f}): MTP {'improves' if d < 0 else 'worsens'} it by {abs(d):.4f} bits/byte.")
    print(f"Training cost: a step with the MTP module takes {a['tokens_per_s_median'] / b['tokens_per_s_median']:.2f}x "
          f"the time of one without (median tokens/s {b['tokens_per_s_median']:.0f} vs {a['tokens_per_s_median']:.0f}).")
    g, smp = spec_results["greedy"], spec_results["sampled (T=0.8, top-k 20)"]
    print(f"MTP drafts accepted: {g['acceptance']:.1%} greedy, {smp['acceptance']:.1%} sampled (T=0.8, top-k 20) "
          f"(V3 reports 85-90% for its second-token prediction).")
    print(f"Speculative decoding: {g['tokens_per_step']:.2f} tokens per step greedy, speed-up {g['spec_tps'] / g['plain_tps']:.2f}x "
          f"greedy and {smp['spec_tps'] / smp['plain_tps']:.2f}x sampled on this CPU (batch 1), with greedy output identical to plain decoding.")
    rep = float(np.mean([np.bincount(o.tokens[0, : o.lengths[0]]).max() / o.lengths[0] for o in outputs["greedy"]]))
    print(f"Caveat: the most frequent token makes up {rep:.0%} of this small model's greedy continuations (on average); "
          + ("such repetition is easy to draft, so the sampled acceptance is the more telling figure." if rep > 0.5
             else "they are not dominated by repetition."))
    """),
]

# ---------------------------------------------------------------------------------------------
# 04: FP8 (written once dsjax's FP8 support is in)

NB04 = [
    md("""
    # 04 · FP8 training with fine-grained scaling

    DeepSeek-V3 trains with its GEMMs in FP8 (e4m3: 4 exponent bits, 3 mantissa bits, largest
    value 448). One scale per *tensor* lets a single outlier decide the scale for everything, pushing
    ordinary values down into e4m3's coarse subnormal range or to zero. V3 scales **activations per
    1x128 tile** (one token, 128 channels) and **weights per 128x128 block**, and promotes the
    partial sums to fp32 every 128 elements of the contraction (V3 report §3.3). The report finds the
    FP8 run's loss within 0.25% of BF16.

    This notebook
    1. trains the same tiny model (`configs/tiny.yaml`, BF16 compute) without and with
       `model.fp8=true` (MLA and FFN projections and the routed experts' GEMMs in e4m3 with those
       scalings, forward and backward; the output head and the router stay in higher precision),
       on the same tokens, and compares the loss curves;
    2. quantizes the BF16-trained model's real weights and the real inputs of its projections
       (captured from a forward pass on validation text) with the quantizers in
       `pallas_kernels.quant`, and compares the error of 1x128 tiles / 128x128 blocks with one
       scale per tensor.
    """),
    setup("04_fp8"),
    code("""
    from dsjax.config import load_config
    from dsjax.train import train

    SIZE = (["model.num_hidden_layers=3", "model.hidden_size=64", "train.seq_len=64", "train.batch_size=4",
             "train.steps=4", "train.warmup_steps=2", "train.decay_steps=2", "train.eval_every=4", "train.eval_batches=1"] if QUICK
            else ["train.batch_size=8", "train.steps=150", "train.decay_steps=130", "train.eval_every=50", "train.eval_batches=16"])
    COMMON = SIZE + [f"train.output_dir={RUNS}", "train.sample_tokens=0", "train.checkpoint_every=100000",
                     "train.log_every=1", "model.dtype=bfloat16", "model.num_nextn_predict_layers=0"]
    RUN_OVERRIDES = {"BF16": ["model.fp8=false", "train.run_name=bf16"], "FP8": ["model.fp8=true", "train.run_name=fp8"]}
    shutil.rmtree(RUNS, ignore_errors=True)
    metrics, last, cfgs = {}, {}, {}
    for name, ov in RUN_OVERRIDES.items():
        cfgs[name] = cfg = load_config("configs/tiny.yaml", COMMON + ov)
        t0 = time.perf_counter()
        last[name] = train(cfg, progress=False)
        last[name]["seconds"] = time.perf_counter() - t0
        metrics[name] = [json.loads(l) for l in (RUNS / cfg.train.run_name / "metrics.jsonl").read_text().splitlines()]
        print(f"  {name}: {last[name]['seconds']:.0f} s, validation {last[name]['val_loss']:.4f} nats/token = "
              f"{last[name]['val_bpb']:.4f} bits/byte")
    """),
    code("""
    W = 1 if QUICK else 10
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8))
    curves = {}
    for i, (name, rows) in enumerate(metrics.items()):
        step, ce = map(np.array, zip(*[(r["step"], r["ce"]) for r in rows if "ce" in r]))
        curves[name] = ce
        k = min(W, len(ce))
        a1.plot(step[k - 1:], np.convolve(ce, np.ones(k) / k, "valid"), color=f"C{i}", alpha=0.7, label=f"{name} train")
        vs, vl = zip(*[(r["step"], r["val_loss"]) for r in rows if "val_loss" in r])
        a1.plot(vs, vl, "o--", color=f"C{i}", label=f"{name} validation")
    rel = (curves["FP8"] - curves["BF16"]) / curves["BF16"]
    k = min(W, len(rel))
    a2.plot(step[k - 1:], 100 * np.convolve(rel, np.ones(k) / k, "valid"), color="C2")
    a2.axhline(0, color="k", lw=0.8)
    a2.set(xlabel="step", ylabel="%", title=f"FP8 vs BF16 train loss, relative difference ({W}-step avg)")
    a1.set(xlabel="step (same tokens for both)", ylabel="nats / token", title="loss")
    if not QUICK:
        a1.set_ylim(top=3.5)
    a1.legend()
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## Quantization error on real weights and activations

    We restore the BF16 run, capture the input and the weight of every projection
    (`nn.DenseGeneral`: MLA's and the dense / shared-expert FFNs') during one forward pass on a
    validation batch with `flax.linen.intercept_methods` (the model unrolled: `scan_layers=false`,
    the same weights split per layer), and add the routed experts' weights. Each is flattened to
    the GEMM's 2-D shape `[tokens, K]` / `[K, N]` and quantized to e4m3 three ways:

    - **per tensor**: one scale `max|x| / 448` for the whole array;
    - **1x128 tiles** (activations, `quantize_tiles`): one scale per token per 128 channels;
    - **128x128 blocks** (weights, `quantize_blocks`).

    Error = `||x - dequant(quant(x))|| / ||x||`; "flushed" = non-zero entries that became zero.
    """),
    code('''
    import flax.linen as nn
    import jax.numpy as jnp
    from dsjax.model import Transformer
    from dsjax.train import restore_model
    from dsjax.train.data import eval_batches, load_splits, make_tokenizer
    from pallas_kernels.quant import (dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles,
                                      scale_from_amax, to_e4m3)

    bcfg, variables = restore_model(RUNS / "bf16")
    unrolled = bcfg.replace(scan_layers=False)


    def unstack(tree):
        """Scanned layer stacks {"layers": leaves [L, ...]} -> {"layer_0": ..., "layer_1": ...} (scan_layers=false)."""
        if isinstance(tree, dict) and set(tree) == {"layers"}:
            n = jax.tree.leaves(tree["layers"])[0].shape[0]
            return {f"layer_{i}": jax.tree.map(lambda a: a[i], tree["layers"]) for i in range(n)}
        return {k: unstack(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


    variables = unstack(jax.device_get(variables))
    data_cfg = cfgs["BF16"]
    _, val_split = load_splits(data_cfg.data, data_cfg.train.seq_len, make_tokenizer(data_cfg.data))
    batch = eval_batches(val_split, data_cfg.train.batch_size, 1)[0]

    captured = []


    def capture(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.DenseGeneral) and context.method_name == "__call__":
            n_in = len(m.axis) if isinstance(m.axis, tuple) else 1
            kernel = np.asarray(nn.meta.unbox(m.variables["params"]["kernel"]), np.float32)
            x = np.asarray(args[0], np.float32)
            k = int(np.prod(kernel.shape[:n_in]))
            captured.append(("/".join(m.path), x.reshape(-1, k), kernel.reshape(k, -1)))
        return next_fun(*args, **kwargs)


    with nn.intercept_methods(capture):
        Transformer(unrolled).apply(variables, batch["tokens"], batch["segment_ids"], batch["positions"])
    experts = [(f"{stack}/{layer}/{name}[{e}]", w[e]) for stack in ("moe_layers",)
               for layer, p in variables["params"].get(stack, {}).items()
               for name, w in p["mlp"].items() if name in ("w_gate", "w_up", "w_down") for e in range(0, w.shape[0], 4)]
    print(f"captured {len(captured)} projection inputs and weights, + {len(experts)} routed-expert weights (every 4th expert)")
    '''),
    code("""
    def err(x, xq):
        nz = x != 0
        return float(np.linalg.norm(xq - x) / np.linalg.norm(x)), float(np.mean((xq == 0) & nz) / max(np.mean(nz), 1e-12))


    def per_tensor(x):
        s = scale_from_amax(jnp.max(jnp.abs(x)))
        return np.asarray(to_e4m3(x, s).astype(jnp.float32) * s)


    def tiles(x):  # 1x128 along K
        q, s = quantize_tiles(jnp.asarray(x), axis=-1)
        return np.asarray(dequantize_tiles(q, s, axis=-1))[:, : x.shape[1]]


    def blocks(w):  # 128x128
        q, s = quantize_blocks(jnp.asarray(w))
        return np.asarray(dequantize_blocks(q, s))[: w.shape[0], : w.shape[1]]


    rows = []
    for name, x, w in captured:
        rows.append(("activation", name, *err(x, per_tensor(x)), *err(x, tiles(x)), float(np.abs(x).max() / np.sqrt(np.mean(x**2)))))
        rows.append(("weight", name, *err(w, per_tensor(w)), *err(w, blocks(w)), float(np.abs(w).max() / np.sqrt(np.mean(w**2)))))
    for name, w in experts:
        rows.append(("weight", name, *err(w, per_tensor(w)), *err(w, blocks(w)), float(np.abs(w).max() / np.sqrt(np.mean(w**2)))))
    print(f"{'kind':11s}{'tensor':44s}{'per-tensor err':>15s}{'flushed':>9s}{'fine err':>10s}{'flushed':>9s}{'max/rms':>9s}")
    for kind, name, e_t, z_t, e_f, z_f, crest in rows:
        if kind == "activation" or "[" not in name:
            print(f"{kind:11s}{name:44s}{e_t:15.4f}{z_t:9.2%}{e_f:10.4f}{z_f:9.2%}{crest:9.1f}")
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for ax, kind, fine in ((axes[0], "activation", "1x128 tiles"), (axes[1], "weight", "128x128 blocks")):
        sel = [r for r in rows if r[0] == kind]
        crest = np.array([r[6] for r in sel])
        ax.scatter(crest, [r[2] for r in sel], label="per tensor", color="C3", s=18)
        ax.scatter(crest, [r[4] for r in sel], label=fine, color="C0", s=18)
        ax.set(xscale="log", yscale="log", xlabel="max|x| / rms(x) of the tensor", ylabel="relative error after e4m3",
               title=f"{kind}s ({len(sel)} tensors)")
        ax.legend()
    fig.tight_layout()
    show(fig)
    """),
    md("""
    The tensors of this small, briefly trained model have few outliers (see their max/rms above),
    which is where per-tensor scaling fails. To show the mechanism on the same real data, we scale
    one token's row of a real activation (the first FFN's `down_proj` input) by a growing factor,
    as an outlier token would, and measure the error on the *other* tokens.
    """),
    code("""
    name, x, _ = next(c for c in captured if c[0].endswith("mlp/down_proj"))
    factors = [1, 10, 100, 1000, 10000, 100000]
    outlier = []
    for f in factors:
        xo = x.copy()
        xo[0] *= f
        outlier.append((err(xo[1:], per_tensor(xo)[1:]), err(xo[1:], tiles(xo)[1:])))
        print(f"token 0 x {f:6d}: other tokens' error per tensor {outlier[-1][0][0]:.4f} ({outlier[-1][0][1]:.2%} flushed), "
              f"1x128 tiles {outlier[-1][1][0]:.4f} ({outlier[-1][1][1]:.2%} flushed)")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.loglog(factors, [o[0][0] for o in outlier], "o-", color="C3", label="per tensor")
    ax.loglog(factors, [o[1][0] for o in outlier], "s-", color="C0", label="1x128 tiles")
    ax.set(xlabel="outlier factor on one token", ylabel="relative error, other tokens", title=f"{name}: one outlier token")
    ax.legend()
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## Conclusion

    Printed from the runs and measurements above.
    """),
    code("""
    b, f = last["BF16"], last["FP8"]
    rel_val = (f["val_loss"] - b["val_loss"]) / b["val_loss"]
    print(f"Training ({cfgs['FP8'].train.steps} steps, same tokens): validation BF16 {b['val_loss']:.4f}, FP8 {f['val_loss']:.4f} "
          f"nats/token: FP8 is {rel_val:+.2%} relative (V3 reports < 0.25% at scale); train loss over the last 20% of steps "
          f"differs by {100 * np.mean(rel[-max(1, len(rel) // 5):]):+.2f}% on average. Wall time: FP8 {f['seconds']:.0f} s vs BF16 "
          f"{b['seconds']:.0f} s (on CPU the FP8 GEMM is an XLA emulation, not a speed-up).")
    for kind, fine in (("activation", "1x128 tiles"), ("weight", "128x128 blocks")):
        sel = np.array([r[2:6] for r in rows if r[0] == kind])
        gm = lambda v: float(np.exp(np.mean(np.log(np.maximum(v, 1e-12)))))
        wins = int(np.sum(sel[:, 2] <= sel[:, 0]))
        print(f"{kind.capitalize()}s ({len(sel)} tensors): relative error per tensor {gm(sel[:, 0]):.4f} vs {fine} {gm(sel[:, 2]):.4f} "
              f"(geometric means; {fine} no worse on {wins} of {len(sel)}), worst {sel[:, 0].max():.4f} vs {sel[:, 2].max():.4f}; "
              f"entries flushed to zero: {sel[:, 1].mean():.3%} vs {sel[:, 3].mean():.3%}; max/rms of these tensors at most "
              f"{max(r[6] for r in rows if r[0] == kind):.0f}.")
    (pt, _), (tl, _) = outlier[-1]
    print(f"With one token {factors[-1]}x larger, the other tokens' error is {pt:.4f} per tensor vs {tl:.4f} with 1x128 tiles "
          f"({pt / tl:.0f}x); at factor 1 it is {outlier[0][0][0]:.4f} vs {outlier[0][1][0]:.4f}.")
    """),
]

# ---------------------------------------------------------------------------------------------
# 05: MoE vs dense

NB05 = [
    md("""
    # 05 · MoE vs dense at the same activated parameters

    DeepSeekMoE's premise: for the same compute per token (activated parameters), many fine-grained
    routed experts plus a shared expert give a better model than a dense feed-forward layer, because
    the total parameter count grows while each token uses only a few experts.

    We train on the same tokens (same seed, same batches, same steps and schedule):
    - **MoE**: `configs/tiny.yaml` (1 dense layer, then MoE layers of 8 routed experts of width 64,
      top-2, plus 1 shared expert), without MTP;
    - **dense**: the same model with every layer dense, its feed-forward width chosen so that
      `count_params(...)["activated"]` matches the MoE's.

    and compare loss curves (per step and per second of wall time) and step time.
    """),
    setup("05_moe_vs_dense"),
    code("""
    from dsjax.config import load_config
    from dsjax.model import count_params
    from dsjax.train import train

    SIZE = (["model.num_hidden_layers=3", "model.hidden_size=64", "train.seq_len=64", "train.batch_size=4",
             "train.steps=8", "train.warmup_steps=2", "train.decay_steps=6", "train.eval_every=4", "train.eval_batches=1"] if QUICK
            else ["train.batch_size=8", "train.steps=200", "train.decay_steps=180", "train.eval_every=50", "train.eval_batches=16"])
    COMMON = SIZE + [f"train.output_dir={RUNS}", "train.sample_tokens=0", "train.checkpoint_every=100000",
                     "train.log_every=1", "model.num_nextn_predict_layers=0"]
    moe = load_config("configs/tiny.yaml", COMMON + ["train.run_name=moe"])
    target = count_params(moe.model)["activated"]
    L = moe.model.num_hidden_layers


    def dense(width):
        return load_config("configs/tiny.yaml", COMMON + ["train.run_name=dense", f"model.first_k_dense_replace={L}",
                                                          f"model.intermediate_size={width}"])


    # activated parameters are linear in the dense width: solve from two points, then check
    w1, w2 = 64, 128
    a1, a2 = (count_params(dense(w).model)["activated"] for w in (w1, w2))
    width = round(w1 + (target - a1) * (w2 - w1) / (a2 - a1))
    dns = dense(width)
    counts = {"MoE": count_params(moe.model), "dense": count_params(dns.model)}
    print(f"dense feed-forward width {width}: activated parameters MoE {counts['MoE']['activated']:,} vs dense "
          f"{counts['dense']['activated']:,} ({counts['dense']['activated'] / counts['MoE']['activated'] - 1:+.2%}); "
          f"total MoE {counts['MoE']['total']:,} vs dense {counts['dense']['total']:,}")
    """),
    code("""
    shutil.rmtree(RUNS, ignore_errors=True)
    metrics, last = {}, {}
    for name, cfg in {"MoE": moe, "dense": dns}.items():
        t0 = time.perf_counter()
        last[name] = train(cfg, progress=False)
        last[name]["seconds"] = time.perf_counter() - t0
        metrics[name] = [json.loads(l) for l in (RUNS / cfg.train.run_name / "metrics.jsonl").read_text().splitlines()]
        steps_s = [r["tokens_per_s"] for r in metrics[name] if "tokens_per_s" in r][1:]  # step 1 includes compilation
        last[name]["tokens_per_s_median"] = float(np.median(steps_s)) if steps_s else last[name]["tokens_per_s"]
        print(f"  {name}: {last[name]['seconds']:.0f} s, median {last[name]['tokens_per_s_median']:.0f} tokens/s, "
              f"validation {last[name]['val_loss']:.4f} nats/token = {last[name]['val_bpb']:.4f} bits/byte")
    """),
    code("""
    W = 1 if QUICK else 10
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, (name, rows) in enumerate(metrics.items()):
        tr = [(r["step"], r["ce"], r["tokens_per_s"]) for r in rows if "ce" in r]
        step, ce, tps = map(np.array, zip(*tr))
        k = min(W, len(ce))
        sm = np.convolve(ce, np.ones(k) / k, "valid")
        tokens_per_step = moe.train.batch_size * moe.train.seq_len
        wall = np.cumsum(np.r_[np.median(tokens_per_step / tps[1:]) if len(tps) > 1 else 0, tokens_per_step / tps[1:]])  # step 1 = compile: use the median
        a1.plot(step[k - 1:], sm, color=f"C{i}", alpha=0.7, label=f"{name} train")
        vs, vl = zip(*[(r["step"], r["val_loss"]) for r in rows if "val_loss" in r])
        a1.plot(vs, vl, "o--", color=f"C{i}", label=f"{name} validation")
        a2.plot(wall[k - 1:], sm, color=f"C{i}", label=name)
    a1.set(xlabel="step (same tokens for both)", ylabel="nats / token", title=f"loss per step ({W}-step avg)")
    a2.set(xlabel="training seconds (compile excluded)", ylabel="nats / token", title="train loss per wall-clock second")
    if not QUICK:
        a1.set_ylim(top=3.5); a2.set_ylim(top=3.5)
    a1.legend(); a2.legend()
    names = list(last)
    a3.bar(names, [moe.train.batch_size * moe.train.seq_len / last[n]["tokens_per_s_median"] * 1e3 for n in names], color=["C0", "C1"])
    a3.set(ylabel="ms per training step (median)", title="step time, CPU")
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## Conclusion

    Printed from the runs above (one seed each).
    """),
    code("""
    m, d = last["MoE"], last["dense"]
    step_ratio = d["tokens_per_s_median"] / m["tokens_per_s_median"]
    print(f"Same activated parameters ({counts['MoE']['activated']:,} vs {counts['dense']['activated']:,}) and the same "
          f"{moe.train.steps * moe.train.batch_size * moe.train.seq_len:,} training tokens; the MoE holds "
          f"{counts['MoE']['total'] / counts['dense']['total']:.2f}x the dense model's total parameters.")
    print(f"Validation: MoE {m['val_loss']:.4f} nats/token ({m['val_bpb']:.4f} bits/byte), dense {d['val_loss']:.4f} "
          f"({d['val_bpb']:.4f}): the MoE is {'better' if m['val_loss'] < d['val_loss'] else 'worse'} by "
          f"{abs(d['val_bpb'] - m['val_bpb']):.4f} bits/byte.")
    print(f"Step time: an MoE step takes {step_ratio:.2f}x the dense step on this CPU "
          f"({m['tokens_per_s_median']:.0f} vs {d['tokens_per_s_median']:.0f} tokens/s, median over logged steps).")
    """),
]

# ---------------------------------------------------------------------------------------------
# 06: GRPO

NB06 = [
    md("""
    # 06 · R1's recipe: cold-start SFT, then GRPO with verifiable rewards

    DeepSeek-R1 (arXiv 2501.12948) trains reasoning with GRPO (DeepSeekMath arXiv 2402.03300
    §4.1, eq. 3): for each prompt the policy samples G completions, rule-based rewards score them,
    and each completion's advantage is its reward relative to its group,
    A_i = (r_i - mean(r)) / std(r). The update maximises the clipped ratio objective of PPO with
    these advantages, minus beta times a k3 estimate of the KL to a frozen reference policy. No
    value network, no learned reward model.

    R1 first fine-tunes on a few thousand long worked solutions (the *cold start*), so that RL
    starts from a policy that already writes `<think>...</think><answer>...</answer>`.
    `configs/grpo_tiny.yaml` does both on a CPU with a tiny V3-shaped MoE policy (MLA, shared and
    routed experts, one MTP module) and a procedural task, sums of small numbers (`chain_sum`):
    1. **SFT** on generated worked solutions, loss on the response tokens only;
    2. **GRPO**: 16 prompts x 8 completions per step, accuracy and format rewards;
    3. the **held-out accuracy** (greedy) before and after GRPO.

    We then plot what the run logged (TRL's metric names), read its completions before and after,
    and time the rollouts with and without the MTP module drafting tokens (`grpo.speculative`).
    The full run takes about 10 minutes on 2 CPU cores (602 s in the committed run).
    """),
    setup("06_grpo"),
    code("""
    from dsjax.config import load_config
    from dsjax.rl.recipe import post_train, task_examples

    SIZE = (["sft.steps=30", "sft.seq_len=128", "grpo.steps=4", "grpo.prompts_per_step=4", "grpo.num_generations=4",
             "grpo.max_completion_length=32", "grpo.eval_every=2", "task.train_examples=256", "task.eval_examples=16"]
            if QUICK else [])  # full mode: configs/grpo_tiny.yaml as it is
    cfg = load_config("configs/grpo_tiny.yaml", SIZE + [f"train.output_dir={RUNS}", "train.run_name=grpo"])
    shutil.rmtree(RUNS, ignore_errors=True)
    train_examples, held_out = task_examples(cfg)  # the sums GRPO trains on; held-out sums never among them
    result = post_train(cfg, progress=False)
    RUN = pathlib.Path(result["directory"])
    rows = [json.loads(l) for l in (RUN / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    evals = [r for r in rows if r["stage"] == "eval"]
    print(f"{len(held_out)} held-out sums, greedy: accuracy {result['before']:.3f} after SFT -> "
          f"{result['after']:.3f} after {cfg.grpo.steps} GRPO steps ({result['seconds']:.0f} s in all)")
    """),
    md("""
    ## Reward, accuracy and completion length

    Per GRPO step, over the step's rollouts (`prompts_per_step` x `num_generations` sampled
    completions at temperature 1): the mean total reward (accuracy + format), the accuracy reward
    alone, and the mean completion length; the dots are the greedy held-out accuracy, measured
    every `eval_every` steps. Rollout curves are noisy (128 samples of 16 prompts per step), so a
    moving average is drawn over them.
    """),
    code("""
    def col(key, rs=None):
        rs = grpo if rs is None else rs
        return np.array([r["step"] for r in rs if key in r]), np.array([r[key] for r in rs if key in r])


    def smooth(y, w):
        w = max(1, min(w, len(y)))
        return np.convolve(y, np.ones(w) / w, "valid"), w


    W = 2 if QUICK else 10
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, key, label in ((axes[0], "reward", "total reward"), (axes[0], "rewards/accuracy/mean", "accuracy reward"),
                           (axes[2], "completions/mean_length", "mean completion length")):
        s, y = col(key)
        ax.plot(s, y, alpha=0.25, color="C0" if key == "reward" else "C1" if "accuracy" in key else "C2")
        ys, w = smooth(y, W)
        ax.plot(s[w - 1:], ys, color="C0" if key == "reward" else "C1" if "accuracy" in key else "C2", label=f"{label} ({w}-step avg)")
    s, acc = col("accuracy", evals)
    axes[1].plot(s, acc, "o-", color="C3")
    axes[0].set(xlabel="GRPO step", title="rollout rewards"); axes[0].legend()
    axes[1].set(xlabel="GRPO step", ylabel="accuracy", title=f"held-out accuracy (greedy, {len(held_out)} sums)")
    axes[2].set(xlabel="GRPO step", ylabel="tokens", title="completion length")
    fig.tight_layout()
    show(fig)
    """),
    md("""
    ## Staying close: KL to the reference, clipping, routing

    `kl` is the k3 estimate per completion token against the reference policy (the SFT result,
    kept in `model.dtype`), weighted by `beta` in the loss. `clip_ratio/region_mean` is the
    fraction of completion tokens whose ratio pi/pi_old left [1 - eps, 1 + eps] on the side where
    the clip bites; with `num_iterations = 1` the update starts at ratio 1, so it stays near 0.
    `routing_mismatch` is the fraction of (token, MoE layer) pairs whose experts differ between the
    rollout and the update's forward pass: 0 here, since both run in fp32 on the same weights.
    """),
    code("""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.3))
    for ax, key in zip(axes, ("kl", "clip_ratio/region_mean", "entropy")):
        ax.plot(*col(key), lw=1)
        ax.set(xlabel="GRPO step", title=key)
    fig.tight_layout()
    show(fig)
    mismatch = col("routing_mismatch")[1]
    print(f"kl: max {col('kl')[1].max():.4f}; clip fraction: max {col('clip_ratio/region_mean')[1].max():.4f}; "
          f"routing mismatch: max {mismatch.max() if len(mismatch) else float('nan'):.4f}")
    """),
    md("""
    ## Completions before and after GRPO

    The run writes the first held-out prompts with the greedy completion and its rewards, after SFT
    (`samples_before.txt`) and after GRPO (`samples_after.txt`).
    """),
    code("""
    def blocks(path, k=3):
        return path.read_text().strip().split("\\n\\n")[:k]


    for name in ("samples_before.txt", "samples_after.txt"):
        print(f"===== {name} =====")
        print("\\n\\n".join(blocks(RUN / name)))
        print()
    """),
    md("""
    ## Rollouts with MTP drafting

    The policy's MTP module (trained in the SFT stage, frozen in GRPO) can draft the next token of
    every rollout; the main model verifies drafts in the next step, so samples still follow the
    policy. We sample one step's rollouts (`prompts_per_step` x `num_generations`) from the trained
    policy both ways, compile first, and keep the best of 3 warm runs each (`python -m
    bench.rollout` measures the same).
    """),
    code("""
    from dsjax.rl.rollout import sample_completions
    from dsjax.train.checkpoint import load_checkpoint

    model_cfg, variables, tokenizer = load_checkpoint(RUN)
    g = cfg.grpo
    prompts = [e.prompt for e in train_examples[: g.prompts_per_step]]
    speed = {}
    for speculative in (False, True):
        runs = [sample_completions(model_cfg, variables, tokenizer, prompts, g.num_generations, g.max_completion_length,
                                   temperature=g.temperature, rng=jax.random.key(r), speculative=speculative).stats
                for r in range(1 if QUICK else 4)]
        speed["MTP drafting" if speculative else "plain"] = max(runs[1:] or runs, key=lambda s: s["rollout_tokens_per_s"])
    for name, s in speed.items():
        extra = f", drafts accepted {s['acceptance']:.1%}" if "acceptance" in s else ""
        print(f"{name:13s} {s['rollout_tokens_per_s']:8.0f} rollout tokens/s{extra}")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(speed), [s["rollout_tokens_per_s"] for s in speed.values()], color=["C0", "C2"])
    ax.set(ylabel="tokens / s (CPU)", title=f"rollouts: {len(prompts)} prompts x {g.num_generations}")
    show(fig)
    """),
    md("""
    ## Conclusion

    Printed from the run above: one seed. Over about a hundred held-out sums, one standard error
    of an accuracy near 0.4 is about 0.05, so a change of a few points is within noise.
    """),
    code("""
    first, last_ = grpo[: max(1, len(grpo) // 5)], grpo[-max(1, len(grpo) // 5):]
    mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
    se = math.sqrt(result["before"] * (1 - result["before"]) / len(held_out))
    print(f"Held-out accuracy (greedy, {len(held_out)} sums): {result['before']:.3f} after SFT -> {result['after']:.3f} "
          f"after GRPO ({result['after'] - result['before']:+.3f}; one standard error of the first is {se:.3f}).")
    print(f"Rollout accuracy: {mean(first, 'rewards/accuracy/mean'):.3f} over the first {len(first)} steps, "
          f"{mean(last_, 'rewards/accuracy/mean'):.3f} over the last {len(last_)}; "
          f"completion length {mean(first, 'completions/mean_length'):.1f} -> {mean(last_, 'completions/mean_length'):.1f} tokens.")
    print(f"KL to the reference stayed at or below {max(r['kl'] for r in grpo):.4f} per token; "
          f"clip fraction at most {max(r['clip_ratio/region_mean'] for r in grpo):.4f}.")
    p, d = speed["plain"], speed["MTP drafting"]
    print(f"Rollouts: {p['rollout_tokens_per_s']:.0f} tokens/s plain, {d['rollout_tokens_per_s']:.0f} with MTP drafting "
          f"({d['rollout_tokens_per_s'] / p['rollout_tokens_per_s']:.2f}x, {d['acceptance']:.1%} of drafts accepted).")
    print(f"The whole recipe took {result['seconds']:.0f} s on {os.cpu_count()} CPU cores.")
    """),
]

NOTEBOOKS = {
    "01_mla_kv_cache": NB01,
    "02_load_balancing": NB02,
    "03_mtp": NB03,
    "04_fp8": NB04,
    "05_moe_vs_dense": NB05,
    "06_grpo": NB06,
}


def make(name: str):
    """The notebook (nbformat node, no outputs) for ``name``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata.update(
        {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
    )
    for kind, src in NOTEBOOKS[name]:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating changes nothing
    return nb


def execute(nb, timeout: int = 3600):
    """Runs ``nb`` in place (kernel cwd: this folder, as when a user opens it)."""
    import nbclient

    nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    return nb


def sources(nb) -> list[tuple[str, str]]:
    return [(c["cell_type"], "".join(c["source"])) for c in nb.cells]


def main(argv=None) -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs="*", metavar="PREFIX", help="execute these notebooks (e.g. 01 03; none named: all)")
    ap.add_argument("--out", type=Path, default=HERE, help="where to write (default: this folder)")
    a = ap.parse_args(argv)
    quick = os.environ.get("QUICK", "0") == "1"
    a.out.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        path = a.out / f"{name}.ipynb"
        nb = make(name)
        if a.run is None:  # write: keep a file (and its outputs) whose sources are unchanged
            if path.exists() and sources(nbformat.read(path, as_version=4)) == sources(nb):
                continue
            print(f"{path}: sources changed, written without outputs (run it: --run {name[:2]})", file=sys.stderr)
        elif a.run and not any(name.startswith(p) for p in a.run):
            continue
        else:
            t0 = time.perf_counter()
            execute(nb)
            seconds = time.perf_counter() - t0
            nb.metadata["dsjax"] = {"quick": quick, "seconds": round(seconds, 1)}
            print(f"{name}: executed in {seconds:.1f} s (QUICK={int(quick)})", file=sys.stderr)
        nbformat.write(nb, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
