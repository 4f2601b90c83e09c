import jax
import pytest


@pytest.fixture
def x64():
  """float64 JAX, so that losses compare with float64 numpy references to rounding."""
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", prev)
