"""Helpers shared by the Pallas kernels: zero-padding to block multiples, and how to compile.

Triton blocks need lengths that are multiples of their size. ``compiler_params`` picks the Triton
lowering on NVIDIA GPUs explicitly: without it this JAX lowers ``pallas_call`` with Mosaic GPU,
which the kernels here are not written for. On CPU the kernels run in interpret mode.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pl_triton


def pad_to_multiple(x, axis: int, multiple: int):
  """``x`` zero-padded at the end of ``axis`` to a multiple of ``multiple``."""
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def interpret() -> bool:
  return jax.default_backend() == "cpu"


def compiler_params(num_warps: int = 4, num_stages: int = 2):
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
