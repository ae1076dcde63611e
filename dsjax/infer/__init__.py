"""Inference: decoding from MLA's latent cache, with sampling and MTP speculative decoding."""

from dsjax.infer.generate import Generation, generate

__all__ = ["Generation", "generate"]
