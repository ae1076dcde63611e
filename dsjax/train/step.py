"""One training step: the loss (``dsjax.train.loss``), gradient accumulation over microbatches,
AdamW, the aux-loss-free bias update, and skipping of non-finite steps.

    b_e <- b_e + gamma * sign(mean_load - load_e)   (DeepSeek-V3 §2.1.2; loads over the whole global batch)
"""

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from dsjax.config import Config, ModelConfig
from dsjax.model.moe import BIAS
from dsjax.model.v4_block import layer_plan
from dsjax.parallel.rules import constrain, logical_shardings, shardings_like_params
from dsjax.train.loss import loss_sums, shifted_ce, target_counts, total_loss, valid_targets
from dsjax.train.optim import lr_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (skipped steps not counted)
    params: Any
    opt_state: Any
    bias: Any  # the selection_bias collection; updated by balancing, never by the optimizer
    nonfinite: jax.Array  # int32: consecutive skipped steps
    skipped: jax.Array  # int32: skipped steps in total


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_state(cfg: Config, model: nn.Module, rng) -> TrainState:
    """Fresh parameters and optimizer state (logical-axis boxes removed), compiled as one program:
    run op by op, the model's init (a whole forward pass) takes several times longer on CPU."""
    tokens = jnp.zeros((1, cfg.train.seq_len), jnp.int32)
    variables = nn.meta.unbox(model.init(rng, tokens))
    params = variables["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, make_optimizer(cfg.train).init(params), variables.get(BIAS, {}), zero, zero)


def abstract_state(cfg: Config, model: nn.Module, shardings: TrainState | None = None) -> TrainState:
    """The TrainState's shapes and dtypes (nothing allocated), with ``shardings`` if given: what a
    checkpoint restores into and the planner compiles for."""
    abstract = jax.eval_shape(lambda: init_state(cfg, model, jax.random.key(0)))
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def state_shardings(cfg: Config, model: nn.Module, mesh) -> TrainState:
    """NamedShardings of the TrainState: params by their logical axes (``dsjax.parallel.rules``),
    optimizer moments like their params, everything else replicated."""
    tokens = jax.ShapeDtypeStruct((1, cfg.train.seq_len), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
    params_sh = logical_shardings(mesh, boxed["params"])
    abstract = abstract_state(cfg, model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = shardings_like_params(abstract.opt_state, abstract.params, params_sh, replicated)
    rest = jax.tree.map(lambda _: replicated, abstract.bias)
    return TrainState(replicated, params_sh, opt_sh, rest, replicated, replicated)


def init_state_sharded(cfg: Config, model: nn.Module, mesh, rng, shardings: TrainState | None = None) -> TrainState:
    """``init_state`` compiled with out_shardings (default ``state_shardings``): every array is created
    directly on its devices, never whole on one host."""
    shardings = shardings or state_shardings(cfg, model, mesh)
    with jax.set_mesh(mesh):
        return jax.jit(lambda r: init_state(cfg, model, r), out_shardings=shardings)(rng)


def update_bias(bias, loads, gamma, cfg: ModelConfig | None = None):
    """b += gamma * sign(mean_load - load), per MoE layer (main stack, then each MTP module).
    ``cfg``: needed for DeepSeek-V4, whose learned-routing layers sit in the stack's runs
    (``dsjax.model.v4_block.layer_plan``); its hash layers have no bias."""

    def step(b, load):
        load = load.astype(jnp.float32)
        return b + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)

    new = jax.tree.map(lambda x: x, bias)  # fresh dicts, same leaves: updated below
    sites = []  # (the dict holding one e_score_correction_bias, that leaf's loads)
    if cfg is not None and cfg.is_v4:
        if loads["main"] is not None:
            for run in layer_plan(cfg):
                for o, (_, mlp) in enumerate(run.kinds):
                    if mlp == "moe":
                        rows = [i for i, _, o2 in run.layers() if o2 == o]  # in repeat order
                        load = loads["main"][jnp.asarray(rows)] if run.repeats > 1 else loads["main"][rows[0]]
                        sites.append((new["layers"][run.name][f"block_{o}"]["ffn"], load))
    elif loads["main"] is not None:
        stack = new["moe_layers"]
        if "layers" in stack:  # scanned: one [L, E] leaf
            sites.append((stack["layers"]["mlp"], loads["main"]))
        else:
            sites += [(stack[f"layer_{i}"]["mlp"], load) for i, load in enumerate(loads["main"])]
    if loads["mtp"] is not None:
        ffn = "ffn" if cfg is not None and cfg.is_v4 else "mlp"
        sites += [(new[f"mtp_{d}"]["block"][ffn], load) for d, load in enumerate(loads["mtp"])]
    for leaf, load in sites:
        leaf["e_score_correction_bias"] = step(leaf["e_score_correction_bias"], load)
    return new


def split_microbatches(batch, micro: int):
    """[B, ...] arrays -> [micro, B / micro, ...]: microbatch j = sequences j, j + micro, ..., so each
    stays split over the batch axes of the mesh."""
    return jax.tree.map(
        lambda a: constrain(a.reshape(a.shape[0] // micro, micro, *a.shape[1:]).swapaxes(0, 1), (None, "batch")),
        batch,
    )


def accumulate_grads(loss_fn, params, microbatches):
    """Sums over microbatches of d loss_fn(params, mb) / d params and of its aux (a pytree of sums):
    ``loss_fn(params, mb) -> (loss, aux)``, each microbatch's loss already scaled by the whole batch."""

    def one(carry, mb):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        return jax.tree.map(jnp.add, carry, (grads, aux)), None

    first = jax.tree.map(lambda a: a[0], microbatches)
    shapes = jax.eval_shape(lambda: (params, loss_fn(params, first)[1]))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(one, zeros, microbatches)[0]


def apply_grads(state: TrainState, grads, loss, tx, bias=None, frozen=lambda params, old: params):
    """One optimizer step, or none when the loss or the gradient is not finite (a skipped step
    changes nothing but the skip counters). ``bias``: the new selection bias (default: unchanged);
    ``frozen(new_params, old_params)``: params with the leaves that must not move put back.
    Returns (new state, ok, gradient norm)."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_state = TrainState(
        step=state.step + ok.astype(jnp.int32),
        params=keep(frozen(optax.apply_updates(state.params, updates), state.params), state.params),
        opt_state=keep(opt_state, state.opt_state),
        bias=state.bias if bias is None else keep(bias, state.bias),
        nonfinite=jnp.where(ok, 0, state.nonfinite + 1),
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    return new_state, ok, grad_norm


def only_indexers(params, old):
    """DSA's dense warm-up (V3.2 §2.1.1): the new params where they are an indexer's, else the old."""

    def pick(path, new, before):
        return new if any(getattr(k, "key", None) == "indexer" for k in path) else before

    return jax.tree_util.tree_map_with_path(pick, params, old)


def make_train_step(cfg: Config, model: nn.Module):
    """(state, batch of [B, S] arrays) -> (state, metrics); jit it."""
    t, depth, micro = cfg.train, cfg.model.num_nextn_predict_layers, cfg.train.microbatches
    tx, lr = make_optimizer(t), lr_schedule(t)

    def step(state: TrainState, batch):
        counts = target_counts(batch, depth)  # over the whole batch: microbatch gradients add up

        def micro_loss(params, one):
            sums, loads = loss_sums(model, params, state.bias, one, depth)
            return total_loss(sums, counts, cfg, micro)[0], (sums, loads)

        grads, (sums, loads) = accumulate_grads(micro_loss, state.params, split_microbatches(batch, micro))
        loss, parts = total_loss(sums, counts, cfg, micro)
        gamma = 0.0 if cfg.model.indexer_warmup else t.bias_update_rate  # warm-up: the main model is frozen
        if t.bias_update_stop_step >= 0:  # the schedule: gamma, then 0 from the stop step on
            gamma = jnp.where(state.step < t.bias_update_stop_step, gamma, 0.0)
        frozen = only_indexers if cfg.model.indexer_warmup else (lambda params, old: params)
        new_bias = update_bias(state.bias, loads, gamma, cfg.model)
        new_state, ok, grad_norm = apply_grads(state, grads, loss, tx, new_bias, frozen)
        main = loads["main"].astype(jnp.float32) if loads["main"] is not None else jnp.ones((1, 1))
        metrics = dict(
            loss=loss,
            **parts,
            grad_norm=grad_norm,
            lr=lr(state.step),
            ok=ok,
            tokens=counts[0],
            load_max_mean=jnp.mean(main.max(-1) / jnp.maximum(main.mean(-1), 1e-9)),
            dropped=sums["dropped"] / micro,
        )
        return new_state, metrics

    return step


def make_eval_step(cfg: Config, model: nn.Module):
    """(params, bias, batch) -> (sum of next-token nats, count)."""

    def evaluate(params, bias, batch):
        out = model.apply({"params": params, BIAS: bias}, batch["tokens"], batch["segment_ids"], batch["positions"])
        return shifted_ce(out.logits, batch["tokens"], batch["segment_ids"], 1), valid_targets(
            batch["segment_ids"], 1
        ).sum()

    return evaluate
