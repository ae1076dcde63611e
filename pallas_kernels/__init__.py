"""Pallas kernels (FP8 block-scaled GEMM, latent attention) with their jnp references.

Empty until the FP8 and attention-kernel issues land; every kernel will sit behind one dispatch
function that falls back to its jnp reference on CPU.
"""
