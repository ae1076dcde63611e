"""Inference: decoding from MLA's latent cache (``generate``: one batch, sampling, MTP speculative
decoding) and serving (``Engine``: continuous batching over a paged latent cache)."""

from dsjax.infer.engine import Engine, RequestOutput, SamplingParams
from dsjax.infer.generate import Generation, generate

__all__ = ["Engine", "Generation", "RequestOutput", "SamplingParams", "generate"]
