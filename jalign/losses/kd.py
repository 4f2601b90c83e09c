"""Top-K knowledge distillation (NeMo-Aligner ``GPTKnowledgeDistillationModel``).

The teacher's top-K logits and their token ids are computed offline and stored per token. Both the
teacher and the student distribution are renormalised over those K ids only:

    p_T = softmax(s_T * z_T[topK]),  p_S = softmax(s_S * z_S[topK ids])
    fwd_kl = sum_k p_T (log p_T - log p_S)     (KL(teacher || student), mode covering)
    bwd_kl = sum_k p_S (log p_S - log p_T)     (KL(student || teacher), NeMo's default ``kd_loss``)
    per token: kd_weight * KD + sft_weight * CE,  CE = -log softmax(s_S * z_S)[label]
    loss = masked mean over ``loss_mask`` (clamped to [0, 1]; divided by max(count, 1))

Because of the renormalisation the KD term needs only the student's logits at the teacher's K ids,
``student_topk_logits [B, T, K]`` (``gather_topk`` of full logits, or any fused gather), never the
full ``[B, T, V]`` student logits or their log-sum-exp; the teacher's stored full-vocab log-sum-exp is
not used by the loss either. The CE term needs the student's full-softmax log-prob of the label,
``student_target_logprobs [B, T]``, which ``jalign.kernels.token_logprobs`` gives without the logits;
NeMo applies ``logits_scale`` before the CE too, so with ``logits_scale != 1`` pass log-probs of the
scaled logits. NeMo's ``cross_tokenizer`` mode (student's own top-K instead of the teacher's ids)
is the caller passing ``jax.lax.top_k(student_logits, K)[0]`` as ``student_topk_logits``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.nn import log_softmax

from jalign.kernels import token_logprobs

KINDS = ("fwd_kl", "bwd_kl")


def _float(x):
  """``x`` as a jnp array of at least float32 precision (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def gather_topk(logits, topk_ids):
  """``logits [B, T, V]`` at ``topk_ids [B, T, K]`` -> ``[B, T, K]``."""
  return jnp.take_along_axis(jnp.asarray(logits), jnp.asarray(topk_ids), axis=-1)


def topk_kl(student_topk_logits, teacher_topk_logits, *, kind="bwd_kl", logits_scale=1.0,
            target_logits_scale=1.0):
  """Per-token KL ``[B, T]`` between the teacher and student distributions renormalised over top-K."""
  if kind not in KINDS:
    raise ValueError(f"kd kind {kind!r} is not one of {KINDS}")
  zs, zt = _float(student_topk_logits), _float(teacher_topk_logits)
  if zs.shape != zt.shape:
    raise ValueError(f"student_topk_logits {zs.shape} and teacher_topk_logits {zt.shape} must match")
  log_ps = log_softmax(logits_scale * zs, axis=-1)
  log_pt = log_softmax(target_logits_scale * zt, axis=-1)
  if kind == "fwd_kl":
    return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return jnp.sum(jnp.exp(log_ps) * (log_ps - log_pt), axis=-1)


def loss(student_topk_logits, teacher_topk_logits, loss_mask, *, student_target_logprobs=None,
         kind="bwd_kl", kd_weight=1.0, sft_weight=0.0, logits_scale=1.0, target_logits_scale=1.0):
  """Top-K KD loss; returns ``(loss, metrics)`` with masked-mean ``kd_loss`` and ``sft_loss``.

  ``student_topk_logits`` / ``teacher_topk_logits``: ``[B, T, K]`` raw (unscaled) logits at the
  teacher's top-K ids; ``loss_mask``: ``[B, T]``; ``student_target_logprobs``: ``[B, T]``, needed when
  ``sft_weight != 0`` (``sft_loss`` is reported whenever it is given, else 0).
  """
  if kd_weight == 0 and sft_weight == 0:
    raise ValueError("kd_weight and sft_weight cannot both be 0")
  if sft_weight != 0 and student_target_logprobs is None:
    raise ValueError("sft_weight != 0 needs student_target_logprobs [B, T] (log-probs of the labels)")
  mask = jnp.clip(_float(loss_mask), 0.0, 1.0)
  zs, zt = _float(student_topk_logits), _float(teacher_topk_logits)
  if zs.shape[:-1] != mask.shape:
    raise ValueError(f"loss_mask {mask.shape} must be the [B, T] of the top-K logits {zs.shape}")
  keep = (mask > 0)[..., None]
  # Zero the logits under the mask so padding (even -inf) can put no NaN into values or gradients.
  kd = topk_kl(jnp.where(keep, zs, 0.0), jnp.where(keep, zt, 0.0), kind=kind, logits_scale=logits_scale,
               target_logits_scale=target_logits_scale)
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  kd_loss = jnp.sum(kd * mask) / denom
  if student_target_logprobs is None:
    sft_loss = jnp.zeros((), kd_loss.dtype)
  else:
    lp = _float(student_target_logprobs)
    if lp.shape != mask.shape:
      raise ValueError(f"student_target_logprobs {lp.shape} must match loss_mask {mask.shape}")
    sft_loss = jnp.sum(jnp.where(mask > 0, -lp, 0.0) * mask) / denom
  total = kd_weight * kd_loss + sft_weight * sft_loss
  return total, {"kd_loss": kd_loss, "sft_loss": sft_loss}


def train_loss(model, batch, rng=None, *, kind="bwd_kl", kd_weight=1.0, sft_weight=0.0, logits_scale=1.0,
               target_logits_scale=1.0):
  """``(loss_sum, target_tokens, metric_sums)`` of a micro-batch of KD rows
  (``data.distillation.kd_row``) for ``trainer.make_train_step``: token-weighted over the global batch.

  The student's logits at the teacher's ids come from the hidden states and the gathered LM-head
  columns (``[B, T, K, H]`` of them, never ``[B, T, V]`` logits); the SFT term's label log-probs from
  ``token_logprobs``.
  """
  del rng
  hidden = model.hidden_states(batch["tokens"], positions=batch.get("positions"), segment_ids=batch["segment_ids"])
  head = model.lm_head_kernel()
  columns = jnp.take(head, batch["teacher_ids"], axis=1)  # [H, B, T, K]
  student = jnp.einsum("bth,hbtk->btk", hidden.astype(jnp.float32), columns.astype(jnp.float32))
  target_lp = token_logprobs(hidden, head, batch["targets"]) if sft_weight else None
  value, metrics = loss(student, batch["teacher_logits"], batch["loss_mask"], student_target_logprobs=target_lp,
                        kind=kind, kd_weight=kd_weight, sft_weight=sft_weight, logits_scale=logits_scale,
                        target_logits_scale=target_logits_scale)
  count = jnp.sum(jnp.clip(batch["loss_mask"].astype(jnp.float32), 0.0, 1.0))
  return value * count, count, {k: v * count for k, v in metrics.items()}
