"""Kernels with one dispatch function each; every implementation has an XLA reference beside it."""

from jalign.kernels.attention import cached_attention, decode_attention, flash_attention
from jalign.kernels.logprobs import token_logprobs

__all__ = ["cached_attention", "decode_attention", "flash_attention", "token_logprobs"]
