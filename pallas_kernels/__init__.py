"""Pallas kernels with their jnp references, each family behind one dispatch function.

- ``quant``: e4m3 quantizers (1x128 / 128x1 tiles, 128x128 blocks), plain jnp.
- ``fp8_gemm``: block-scaled FP8 GEMM (``fp8_gemm``): jnp reference, Mosaic TPU, Triton GPU.
- ``fp8_gmm``: the grouped versions for routed experts (``fp8_gmm``, ``fp8_gmm_wgrad``).
- ``flash_mla``: flash attention with MLA's head shapes (q/k 128 + 64, v 128), causal within
  segments, forward + dQ / dK-dV backward kernels; ``mla_decode``: split-K absorbed MLA decode over
  the latent cache. Mosaic TPU and Triton GPU; jnp references and dispatch in ``dsjax.model.attention``.
"""
