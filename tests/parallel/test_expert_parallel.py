"""dsjax.parallel.expert_parallel: receivers rebuild the expert ids of the rows they get from one
all_gather of per-expert counts (no id travels), for both exchanges' layouts."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsjax.parallel.expert_parallel import arrivals, fixed_received_ids, ragged_received_ids


@pytest.mark.parametrize("cap", [40, 7, 2])  # dropless (all 40 rows fit anywhere), and two capacity limits
def test_received_expert_ids_are_rebuilt_from_gathered_counts(cap):
    """No expert id travels with the rows: each device gathers every device's per-expert row counts
    and rebuilds the ids of the rows it receives. On 8 devices with 2 experts each, they equal the
    ids of the rows that land in each slot, worked out here in numpy from the two exchanges'
    layouts (fixed: [source, cap] slots; ragged: the sources' kept rows end to end)."""
    n, e_local, m = 8, 2, 40
    rng = np.random.default_rng(cap)
    eid = np.sort(rng.choice(16, size=(n, m), p=np.r_[np.full(4, 0.15), np.full(12, 0.4 / 12)]), axis=1)  # skewed
    mesh = jax.make_mesh((n,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])

    def local(e):
        fits = arrivals(e, e_local, n, cap)[1]
        return fixed_received_ids(fits, cap)[None], ragged_received_ids(fits, n * cap)[None]

    fixed, ragged = jax.shard_map(local, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))(eid.reshape(-1))
    for me in range(n):
        chunks = [eid[s][eid[s] // e_local == me][:cap] % e_local for s in range(n)]
        want_fixed = np.stack([np.pad(c, (0, cap - len(c)), constant_values=e_local) for c in chunks])
        kept = np.concatenate(chunks)
        want_ragged = np.pad(kept, (0, n * cap - len(kept)), constant_values=e_local)
        np.testing.assert_array_equal(np.asarray(fixed[me]), want_fixed)
        np.testing.assert_array_equal(np.asarray(ragged[me]), want_ragged)
    assert (cap < m) == any(len(eid[s][eid[s] // e_local == d]) > cap for s in range(n) for d in range(n))
