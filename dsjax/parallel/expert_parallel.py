"""Expert parallelism's exchange: token copies to their experts' devices and the results back.

Inside a shard_map, each device holds its tokens' copies sorted by global expert id; experts are
split evenly over the mesh axis of ``experts`` (``mesh_axes("experts")``), so a copy's destination
is its expert id // experts per device. One all-to-all sends every copy there, the experts run on
what arrived, and a second all-to-all brings the results back. No expert id travels: one
all_gather of every device's per-expert row counts lets each receiver rebuild the ids of the rows
it gets (``arrivals``). A capacity factor bounds the rows one device pair may exchange (the rest
are dropped and reported); 0 means dropless (room for every copy).

Two transports with the same result: ``all_to_all`` through fixed [devices, capacity] buffers
(every backend, CPU included: XLA:CPU has no ragged all-to-all), and ``ragged_all_to_all``, where
only the rows in use travel (GPU / TPU). The rows can travel in another format (V3 sends them in
FP8): the caller passes ``to_experts`` / ``from_experts``, each ``(move, x, aux) -> move(x, aux)``
by default.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsjax.parallel.rules import mesh_axes

EXPERTS = mesh_axes("experts")  # the mesh axis the routed experts, and so the exchange, run over
DISPATCHES = ("all_to_all", "ragged_all_to_all")


def as_is(move, x, aux):
    """The default transport: ``move(x, aux)`` on the rows as they are."""
    return move(x, aux)


def resolve_dispatch(dispatch: str, platform: str) -> str:
    """``auto``: fixed buffers on CPU (no ragged all-to-all there), ragged on GPU / TPU."""
    if dispatch == "auto":
        return "all_to_all" if platform == "cpu" else "ragged_all_to_all"
    if dispatch not in DISPATCHES:
        raise ValueError(f"expert_dispatch={dispatch!r}: expected auto, {', '.join(DISPATCHES)}")
    return dispatch


def capacity(m: int, n_ep: int, factor: float) -> int:
    """Receive rows per device pair for m token copies: all m when dropless, else factor x the even share."""
    return m if factor == 0 else min(m, math.ceil(factor * m / n_ep))


def arrivals(eid, e_local: int, n_ep: int, cap: int):
    """What each source sends here, from one all_gather of every device's per-expert row counts
    (the rows themselves go sorted by expert, at most ``cap`` per destination): [source, local
    expert] counts that fit. The receiver rebuilds the rows' expert ids from them, so no id travels."""
    counts = jax.lax.all_gather(jnp.bincount(eid, length=n_ep * e_local).astype(jnp.int32), EXPERTS)
    counts = counts.reshape(n_ep, n_ep, e_local)  # [source, destination, local expert]
    mine = counts[:, jax.lax.axis_index(EXPERTS)]
    return counts, jnp.clip(cap - (jnp.cumsum(mine, axis=-1) - mine), 0, mine)


def _segment_ids(counts, n: int):
    """Index of the segment each of n positions falls in, segments of ``counts`` rows laid end to end
    (positions past them: len(counts))."""
    return jnp.searchsorted(jnp.cumsum(counts), jnp.arange(n), side="right").astype(jnp.int32)


def fixed_received_ids(fits, cap: int):
    """Local expert ids of the fixed exchange's [source, cap] slots (e_local: an empty slot)."""
    return jax.vmap(_segment_ids, (0, None))(fits, cap)


def ragged_received_ids(fits, room: int):
    """Local expert ids of the ragged exchange's ``room`` rows: the sources' chunks end to end."""
    e_local = fits.shape[-1]
    segment = _segment_ids(fits.reshape(-1), room)
    return jnp.where(segment < fits.size, segment % e_local, e_local)


def exchange(rows, eid, e_local: int, factor: float, expert_fn, dispatch: str, to_experts=as_is, from_experts=as_is):
    """Inside a shard_map: rows [m, H] sorted by global expert id ``eid`` [m] go to their experts'
    devices, ``expert_fn(received rows, local expert ids)`` runs there (id e_local: an empty slot),
    and the results come back. Returns (results in the rows' order, kept [m]: False = dropped)."""
    n_ep = jax.lax.axis_size(EXPERTS)
    run = _exchange_fixed if dispatch == "all_to_all" else _exchange_ragged
    return run(rows, eid, e_local, n_ep, capacity(rows.shape[0], n_ep, factor), expert_fn, to_experts, from_experts)


def all_to_all(x, aux=()):
    """The fixed exchange's move: block i of x's leading dim to device i of the experts' axis."""
    return jax.lax.all_to_all(x, EXPERTS, 0, 0, tiled=True)


def _exchange_fixed(rows, eid, e_local, n_ep, cap, expert_fn, to_experts, from_experts):
    """Through fixed [n_ep, cap] buffers with ``all_to_all``."""
    m, hdim = rows.shape
    dest = eid // e_local
    sizes = jnp.bincount(dest, length=n_ep)
    rank = jnp.arange(m) - (jnp.cumsum(sizes) - sizes)[dest]  # slot within the destination's chunk
    kept = rank < cap
    slot = jnp.where(kept, rank, cap)  # out of range: dropped by mode="drop"
    send = jnp.zeros((n_ep, cap, hdim), rows.dtype).at[dest, slot].set(rows, mode="drop")
    recv = to_experts(all_to_all, send, ())  # [source, cap, H]
    recv_id = fixed_received_ids(arrivals(eid, e_local, n_ep, cap)[1], cap)
    out = expert_fn(recv.reshape(n_ep * cap, hdim), recv_id.reshape(-1)).reshape(n_ep, cap, hdim)
    back = from_experts(all_to_all, out, ())  # [destination, cap, H], our rows
    return back[dest, jnp.minimum(slot, cap - 1)], kept


def _exchange_ragged(rows, eid, e_local, n_ep, cap, expert_fn, to_experts, from_experts):
    """With ``ragged_all_to_all``: only the rows in use travel."""
    m = rows.shape[0]
    counts, fits = arrivals(eid, e_local, n_ep, cap)
    wanted = counts.sum(-1)  # [source, destination]: rows each source has for each destination
    sent = jnp.minimum(wanted, cap)  # beyond the capacity: dropped
    starts = jnp.cumsum(wanted, axis=1) - wanted  # where those rows begin in the source's sorted rows
    me = jax.lax.axis_index(EXPERTS)
    kept = jnp.arange(m) - starts[me][eid // e_local] < cap
    before = jnp.cumsum(sent, axis=0) - sent  # rows that earlier sources put in each destination
    recv_sizes = sent[:, me]
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    room = n_ep * cap

    def send(operand, aux, n_out):  # aux: (input offsets, send sizes, output offsets, receive sizes)
        buf = jnp.zeros((n_out, *operand.shape[1:]), operand.dtype)
        return jax.lax.ragged_all_to_all(operand, buf, *aux, axis_name=EXPERTS)

    recv = to_experts(lambda v, a: send(v, a, room), rows, (starts[me], sent[me], before[me], recv_sizes))
    out = expert_fn(recv, ragged_received_ids(fits, room))
    # Back: my received chunk from source s returns to s's sorted rows, at its start for me.
    back = from_experts(lambda v, a: send(v, a, m), out, (recv_offsets, recv_sizes, starts[:, me], sent[me]))
    return back, kept
