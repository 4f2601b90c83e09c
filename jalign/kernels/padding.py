"""Zero-padding shared by the kernels, whose blocks need lengths that are multiples of their size."""

import jax.numpy as jnp


def pad_to_multiple(x, axis: int, multiple: int):
  """``x`` zero-padded at the end of ``axis`` to a multiple of ``multiple``."""
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)
