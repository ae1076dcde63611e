"""Decoding from the latent KV cache: prefill, step decoding, sampling, MTP speculative decoding.

    out = generate(cfg, variables, [[256, 100, 101], [256, 102]], max_new_tokens=32)  # greedy
    out.tokens   # [B, max_new_tokens] int32: each row's new tokens (EOS included), then -1
    out.lengths  # [B] new tokens per row;  out.stats: steps, tokens/s, draft acceptance

    dsjax-generate --checkpoint DIR --prompt "def " [--max-new-tokens N --temperature T
        --top-k K --top-p P --speculative]       # DIR: a training run or a hub-format HF directory

Rows are right-padded: a row's token i sits at position i and in cache slot i, and ``lengths``
counts each row's cached tokens, so prompts of different lengths decode together, every row at
its own position. A query at position p attends to the cache slots <= p; every call writes its
tokens' slots before attending, so whatever lies beyond a row's length (padding, rejected drafts)
is overwritten before any query can reach it. Buffers are sized max prompt + max_new_tokens (+ D):
one compiled step serves every position.

Speculative decoding with the D MTP modules as drafters (DeepSeek-V3 §2.2). A row holds n cached
tokens and its last accepted token t_n (not yet cached) is followed by drafts d_{n+1} .. d_{n+D}:
  verify  one forward of the main model over [t_n, d_{n+1} .. d_{n+D}] at positions n .. n+D gives
          its own choices g_{n+1} .. g_{n+D+1}; the drafts are accepted while d_j = g_j (a of them),
          then g_{n+a+1}: a + 1 new tokens, n <- n + a + 1 (temperature > 0: g are samples, so the
          output keeps the main model's distribution).
  draft   module k at position i reads h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1}: with n
          cached tokens, module k at position n - 1 drafts d_{n+k}. Module k's cache entries for
          i > n - k were built from drafts, so each step reruns every module over positions
          n_old - D + 1 .. n_old + D (h^0 of the D - 1 positions before n_old is carried over).
Greedy speculative output equals greedy decoding token for token.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.attention import resolve_impl
from dsjax.model.transformer import build_model, init_cache


@flax.struct.dataclass
class Sampling:
    """Greedy at temperature 0; else softmax(logits / temperature) restricted to the top_k most
    likely tokens (0: all) and to the top_p nucleus (the fewest most likely tokens holding >= top_p).
    Traced values: one compiled step serves every setting."""

    temperature: jax.Array  # [] float
    top_k: jax.Array  # [] int
    top_p: jax.Array  # [] float

    def __call__(self, logits, key):
        """Token ids [...] from logits [..., V]: argmax, or one draw per position."""
        return jax.lax.cond(self.temperature > 0, self._draw, _argmax, logits, key)

    def _draw(self, logits, key):
        """x ~ softmax(logits / T) over the top-k ranks whose preceding probability mass is < top_p."""
        scaled = logits / self.temperature
        desc = -jnp.sort(-scaled, axis=-1)
        rank = jnp.arange(logits.shape[-1])
        in_top_k = rank < jnp.where(self.top_k > 0, self.top_k, logits.shape[-1])
        probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
        keep = in_top_k & (jnp.cumsum(probs, axis=-1) - probs < self.top_p)
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        return jax.random.categorical(key, jnp.where(scaled < cutoff, -jnp.inf, scaled)).astype(jnp.int32)


@flax.struct.dataclass
class RowSampling:
    """``Sampling`` with each row's own settings and keys (the serving engine's batches mix
    requests): row b's token at window index w draws with fold_in(fold_in(key(seed_b), stream_b),
    index_b + w), so a row samples the same tokens whatever else is batched with it. All fields [B];
    the key argument is unused."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array  # uint32
    stream: jax.Array  # e.g. the completion's index among its request's n
    index: jax.Array  # the index (in its completion) of the token sampled at window index 0

    def __call__(self, logits, key=None):
        """Token ids [B] or [B, W] from logits [B, V] or [B, W, V]."""
        window = logits if logits.ndim == 3 else logits[:, None]

        def row(logits, t, k, p, seed, stream, index):
            base = jax.random.fold_in(jax.random.key(seed), stream)
            keys = jax.vmap(lambda w: jax.random.fold_in(base, index + w))(jnp.arange(logits.shape[0]))
            return jax.vmap(Sampling(t, k, p))(logits, keys)

        fields = (self.temperature, self.top_k, self.top_p, self.seed, self.stream, self.index)
        out = jax.vmap(row)(window, *fields)
        return out if logits.ndim == 3 else out[:, 0]


def _argmax(logits, key):
    """argmax_v logits (greedy; the key is unused)."""
    return jnp.argmax(logits, -1).astype(jnp.int32)


@flax.struct.dataclass
class DecodeState:
    cache: dict  # init_cache(...): LatentCache per layer stack (and per MTP module)
    tokens: jax.Array  # [B, T] int32: prompt, accepted tokens, then drafts; slot i = position i
    lengths: jax.Array  # [B] cached tokens; tokens[b, lengths[b]] is the last accepted token
    end: jax.Array  # [B] prompt length + max_new_tokens: the row stops when lengths + 1 reaches it
    eos: jax.Array  # [] int32: a row stops after this token (-1: none)
    done: jax.Array  # [B] bool
    rng: jax.Array  # split once per step (sampling)
    hidden: jax.Array  # [B, D - 1, H] speculative: h^0 at positions lengths - D + 1 .. lengths - 1
    drafted: jax.Array  # [] drafts proposed to live rows
    accepted: jax.Array  # [] drafts accepted
    routes: jax.Array  # [L_moe, B, T, K] int32 record_routes: experts chosen at each cached position, else [0]


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, max_new_tokens] int32, -1 after a row's last token
    lengths: np.ndarray  # [B]
    stats: dict
    # record_routes: [L_moe, B, S + max_new_tokens, K] experts each position's token went to in the
    # main model's MoE layers (prompt, then new tokens; -1 where no token was run: padding, the last)
    routes: np.ndarray | None = None


def _gather(x, idx):
    """x[b, idx[b, k]] for x [B, T, ...] and idx [B, K] (indices clipped into range)."""
    idx = jnp.clip(idx, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, idx.reshape(*idx.shape, *(1,) * (x.ndim - 2)), axis=1)


def _run(cfg: ModelConfig, variables, method: str, *args):
    """build_model(cfg).<method>(*args) with the given variables."""
    return build_model(cfg).apply(variables, *args, method=method)


def _live(cfg: ModelConfig, pos, last):
    """DeepSeek-V4's caches keep only recent positions, so the positions past ``last`` [B, 1] (prompt
    padding, tokens not known yet) go in as -1: not attended to, not written. V2/V3 latent caches
    hold every position: theirs are overwritten later, as they are."""
    return jnp.where(pos <= last, pos, -1) if cfg.is_v4 else pos


def _record(state: DecodeState, router, pos) -> DecodeState:
    """Writes the experts the tokens at ``pos`` [B, W] went to (router [L, B, W, K]) into state.routes."""
    if not state.routes.size or router is None:
        return state
    rows = jnp.arange(pos.shape[0])[:, None]
    return state.replace(routes=state.routes.at[:, rows, pos].set(router.expert_ids, mode="drop"))


def _accept(state: DecodeState, new, count) -> DecodeState:
    """Appends to each live row the first ``count`` [B] of ``new`` [B, K], up to its first EOS and its end."""
    k = jnp.arange(new.shape[1])
    slot = state.lengths[:, None] + 1 + k
    eos = new == state.eos
    keep = (k < count[:, None]) & (slot < state.end[:, None]) & ~state.done[:, None]
    keep &= jnp.cumsum(eos, axis=1) - eos == 0  # nothing after the first EOS
    n = keep.sum(1)
    lengths = state.lengths + n
    done = state.done | (lengths + 1 >= state.end) | ((n > 0) & _gather(eos, n[:, None] - 1)[:, 0])
    rows = jnp.arange(new.shape[0])[:, None]
    tokens = state.tokens.at[rows, jnp.where(keep, slot, state.tokens.shape[1])].set(new, mode="drop")
    return state.replace(tokens=tokens, lengths=lengths, done=done)


def _draft(cfg: ModelConfig, variables, state: DecodeState, h0, start) -> DecodeState:
    """Runs the MTP modules over positions start .. start + W - 1 (h0 [B, W, H]: h^0 there), writing
    their caches, and drafts d_{n+1} .. d_{n+D} after each row's last accepted token (greedy)."""
    d = cfg.num_nextn_predict_layers
    pos = start[:, None] + jnp.arange(h0.shape[1])
    last = (state.lengths - 1 - start)[:, None]  # window index of position n - 1
    rows = jnp.arange(pos.shape[0])[:, None]
    tokens, cache, h = state.tokens, state.cache, h0
    for k in range(d):  # module k + 1: h^{k} and Emb(t_{i+k+1}) -> t_{i+k+2}
        live = _live(cfg, pos, state.lengths[:, None] - k - 1)  # t_{i+k+1} is known
        h, normed, cache = _run(cfg, variables, "draft", k, h, _gather(tokens, pos + k + 1), live, cache)
        guess = jnp.argmax(_run(cfg, variables, "logits", _gather(normed, last)), -1)
        tokens = tokens.at[rows, state.lengths[:, None] + k + 1].set(guess.astype(jnp.int32), mode="drop")
    hidden = _gather(h0, last - (d - 2) + jnp.arange(d - 1))  # positions n - D + 1 .. n - 1
    return state.replace(tokens=tokens, cache=cache, hidden=hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "speculative"), donate_argnames=("state",))
def _prefill(cfg, speculative, variables, sampling: Sampling, prompt, state: DecodeState) -> DecodeState:
    """Caches the prompts [B, S] (positions 0 .. S-1), samples each row's first token after its
    last prompt token (state.lengths = prompt length - 1) and, speculative, drafts."""
    pos = jnp.broadcast_to(jnp.arange(prompt.shape[1]), prompt.shape)
    h, normed, cache, router = _run(
        cfg, variables, "decode", prompt, _live(cfg, pos, state.lengths[:, None]), state.cache
    )
    state = _record(state, router, jnp.where(pos <= state.lengths[:, None], pos, state.tokens.shape[1]))
    rng, key = jax.random.split(state.rng)
    first = sampling(_run(cfg, variables, "logits", _gather(normed, state.lengths[:, None])), key)
    state = _accept(state.replace(cache=cache, rng=rng), first, jnp.ones_like(state.lengths))
    return _draft(cfg, variables, state, h, jnp.zeros_like(state.lengths)) if speculative else state


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def _step(cfg, variables, sampling: Sampling, state: DecodeState) -> DecodeState:
    """One token per row: the last accepted token goes into the cache, the next is sampled."""
    pos = state.lengths[:, None]
    _, normed, cache, router = _run(cfg, variables, "decode", _gather(state.tokens, pos), pos, state.cache)
    state = _record(state, router, jnp.where(state.done[:, None], state.tokens.shape[1], pos))
    rng, key = jax.random.split(state.rng)
    nxt = sampling(_run(cfg, variables, "logits", normed), key)
    return _accept(state.replace(cache=cache, rng=rng), nxt, jnp.ones_like(state.lengths))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def _speculative_step(cfg, variables, sampling: Sampling, state: DecodeState) -> DecodeState:
    """Verify [t_n, drafts] in one forward, accept the matching prefix + the model's next token, draft anew."""
    d = cfg.num_nextn_predict_layers
    n = state.lengths
    pos = n[:, None] + jnp.arange(d + 1)
    window = _gather(state.tokens, pos)  # t_n, d_{n+1} .. d_{n+D}
    h, normed, cache, router = _run(cfg, variables, "decode", window, pos, state.cache)
    state = _record(state, router, jnp.where(state.done[:, None], state.tokens.shape[1], pos))
    rng, key = jax.random.split(state.rng)
    g = sampling(_run(cfg, variables, "logits", normed), key)  # g_{n+1} .. g_{n+D+1}
    a = jnp.cumprod(window[:, 1:] == g[:, :-1], axis=1).sum(1)  # drafts accepted
    live = ~state.done
    state = state.replace(
        cache=cache,
        rng=rng,
        drafted=state.drafted + d * live.sum(),
        accepted=state.accepted + jnp.where(live, a, 0).sum(),
    )
    state = _accept(state, g, a + 1)
    return _draft(cfg, variables, state, jnp.concatenate([state.hidden, h], axis=1), n - d + 1)


def _pad(prompts) -> tuple[np.ndarray, np.ndarray]:
    """A list of token lists, or (array [B, S], lengths [B]) -> right-padded int32 array, lengths."""
    if isinstance(prompts, tuple):
        arr, lens = np.asarray(prompts[0], np.int32), np.asarray(prompts[1], np.int32)
    else:
        lens = np.asarray([len(p) for p in prompts], np.int32)
        arr = np.zeros((len(prompts), lens.max(initial=1)), np.int32)
        for row, p in zip(arr, prompts):
            row[: len(p)] = p
    if not len(lens) or lens.min() < 1 or lens.max() > arr.shape[1]:
        raise ValueError(f"prompt lengths {lens.tolist()}: each prompt needs 1 .. {arr.shape[1]} tokens")
    return arr, lens


def generate(
    cfg: ModelConfig,
    variables,
    prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    rng=None,
    speculative: bool = False,
    record_routes: bool = False,
) -> Generation:
    """Continues each prompt by up to ``max_new_tokens`` tokens (a row stops after ``eos_id``).

    prompts: a list of token lists, or (right-padded array [B, S], lengths [B]). ``rng``: a
    ``jax.random.key`` for sampling (default key(0)). ``speculative``: draft with the MTP modules.
    ``record_routes``: also return the experts every token went to (``Generation.routes``), for
    routing replay and the rollout-vs-training routing mismatch of RL (``dsjax.rl``).
    stats: compile time (0 for shapes compiled before), prefill and decode times, decode tokens/s
    (tokens after each row's first, which the prefill produces; steady decoding only), and for
    speculative decoding the fraction of drafts accepted and the new tokens per row per step.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    d = cfg.num_nextn_predict_layers if speculative else 0
    if speculative and not d:
        raise ValueError("speculative decoding drafts with the MTP modules: num_nextn_predict_layers is 0")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: need >= 0, >= 1, in (0, 1]")
    sampling = Sampling(jnp.float32(temperature), jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p))
    prompt, lens = _pad(prompts)
    b, s = prompt.shape
    size = s + max_new_tokens + d
    if int(lens.max()) + max_new_tokens + d > cfg.max_position_embeddings:
        raise ValueError(f"a prompt of {int(lens.max())} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context, max_position_embeddings={cfg.max_position_embeddings}")  # fmt: skip
    slots = -(-size // 128) * 128 if resolve_impl(cfg.attention_impl) == "pallas" else size  # whole kernel blocks
    state = DecodeState(
        cache=init_cache(cfg, b, slots, with_mtp=speculative),
        tokens=jnp.zeros((b, size), jnp.int32).at[:, :s].set(prompt),
        lengths=jnp.asarray(lens - 1),
        end=jnp.asarray(lens + max_new_tokens),
        eos=jnp.int32(-1 if eos_id is None else eos_id),
        done=jnp.zeros((b,), bool),
        rng=jax.random.key(0) if rng is None else jnp.copy(rng),  # the state is donated: not the caller's key
        hidden=jnp.zeros(
            (b, max(d - 1, 0), *((cfg.hc_mult,) if cfg.is_v4 else ()), cfg.hidden_size), jnp.dtype(cfg.dtype)
        ),
        drafted=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((), jnp.int32),
        routes=jnp.full(
            (cfg.num_moe_layers, b, size, cfg.num_experts_per_tok) if record_routes else (0,), -1, jnp.int32
        ),
    )
    variables, prompt = jax.device_put(variables), jnp.asarray(prompt)
    t0 = time.perf_counter()  # compiled first (once per shapes: JAX keeps them), so the timings are steady
    prefill = _prefill.lower(cfg, speculative, variables, sampling, prompt, state).compile()
    step = (_speculative_step if speculative else _step).lower(cfg, variables, sampling, state).compile()
    t1 = time.perf_counter()
    state = jax.block_until_ready(prefill(variables, sampling, prompt, state))
    t2 = time.perf_counter()
    steps = 0
    while not bool(state.done.all()):
        state = step(variables, sampling, state)
        steps += 1
    t3 = time.perf_counter()

    buf, count = np.asarray(state.tokens), np.asarray(state.lengths) + 1 - lens
    out = np.full((b, max_new_tokens), -1, np.int32)
    for i in range(b):
        out[i, : count[i]] = buf[i, lens[i] : lens[i] + count[i]]
    stats = {
        "new_tokens": int(count.sum()),
        "steps": steps,
        "compile_s": round(t1 - t0, 4),
        "prefill_s": round(t2 - t1, 4),
        "decode_s": round(t3 - t2, 4),
        "decode_tokens_per_s": round(float(count.sum() - b) / max(t3 - t2, 1e-9), 2),  # after the first
    }
    if speculative:
        stats["acceptance"] = round(int(state.accepted) / max(int(state.drafted), 1), 4)
        stats["tokens_per_step"] = round(float(count.sum() - b) / max(steps, 1) / b, 3)
    routes = None
    if record_routes:  # positions past each row's cached tokens hold rejected drafts' or nothing's
        routes = np.array(state.routes[:, :, : s + max_new_tokens])
        routes[:, np.arange(routes.shape[2])[None, :] >= np.asarray(state.lengths)[:, None]] = -1
    return Generation(out, count, stats, routes)
