"""Every Pallas kernel lowers to Triton for NVIDIA GPUs, checked on CPU at GPU-sized shapes.

Lowering runs Pallas's Triton lowering rules (the step where unsupported ops, block shapes and
the choice between Triton and Mosaic GPU fail) without a GPU; only Triton's own compile to PTX is
left for a GPU run (bench/gpu_kernels.py).
"""

import jax
import jax.numpy as jnp
import pytest

from jalign.kernels import attention_pallas, decode_pallas, logprobs_pallas


@pytest.fixture(autouse=True)
def compiled_not_interpreted(monkeypatch):
  for module in (attention_pallas, decode_pallas, logprobs_pallas):
    monkeypatch.setattr(module, "interpret", lambda: False)


def lower_for_gpu(fn, *shapes):
  text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in text
  return text


bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)


@pytest.mark.parametrize("segments", ["none", "segments", "branches"])
def test_flash_attention_forward_and_backward(segments):
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)

  def loss(q, k, v, s):
    out = attention_pallas.attention_pallas(q, k, v, segment_ids=None if segments == "none" else s,
                                            branch_ids=s % 3 if segments == "branches" else None, block_q=128)
    return jnp.sum(out.astype(jnp.float32))

  lower_for_gpu(lambda q, k, v, s: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, s),
                bf16(1, 256, 8, 128), bf16(1, 256, 2, 128), bf16(1, 256, 2, 128), seg)


def test_decode_attention():
  lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
  lower_for_gpu(lambda q, k, v, n: decode_pallas.decode_attention_pallas(q, k, v, n, sliding_window=100),
                bf16(4, 8, 128), bf16(4, 1024, 2, 128), bf16(4, 1024, 2, 128), lengths)


def test_token_logprobs_forward_and_backward():
  targets = jax.ShapeDtypeStruct((2, 256), jnp.int32)

  def loss(h, w, t):
    lp, ent = logprobs_pallas.token_logprobs_pallas(h, w, t, return_entropy=True)
    return jnp.sum(lp) + jnp.sum(ent)

  lower_for_gpu(lambda h, w, t: jax.grad(loss, argnums=(0, 1))(h, w, t), bf16(2, 256, 2048), bf16(2048, 32000),
                targets)
