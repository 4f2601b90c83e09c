"""The generation server's endpoints for a config's policy (``config.model`` with its tokenizer), and its
client ``RemoteGenerator``, whose ``generate`` is ``jalign.rollout.generate`` without the model.

Endpoints (HTTP; one request at a time, each a whole batch; sampling settings optional, defaults as in
``jalign.rollout.generate``; stop ids default to the tokenizer's end of sequence):
  ``generate``       tokens [B,P] int64 right-padded, sequence_lengths [B,1], max_new_tokens [1];
                     min_new_tokens, top_k, seed [1] int64; temperature, top_p [1] float32; greedy [1] bool;
                     stop_ids [K] int64 -> tokens [B,T], lengths [B,1], is_end [B,1] bool, logprobs [B,T]
                     (the ``Rollout`` fields)
  ``generate_text``  sentences [B] bytes (UTF-8 prompts, encoded as the config's prompts are) and the same
                     settings -> sentences [B] bytes (the responses, decoded without special tokens)
  ``rollout``        tokens [B,P], sequence_lengths [B,1], request [1] bytes (a ``Request`` as JSON) ->
                     tokens [B,R] (the responses, right-padded), lengths [B,1] (theirs), is_end [B,1],
                     logprobs [B,R] float32, version [1] (the weights' version): a served engine's rollout
  ``refit``          manifest [1] bytes (``jalign.rollout.refit``'s JSON), timeout_s [1] float32 -> version,
                     buckets, bytes [1] int64, seconds [1] float32; a refit that fails answers why and
                     leaves the server on the version it had
The job behind them is ``jalign.recipes.generation.GenerationJob``.
"""

from __future__ import annotations

import threading

import numpy as np

from jalign.rollout import refit as refit_lib
from jalign.rollout.generate import Rollout
from jalign.rollout.sampling import Request, Samples
from jalign.serve import triton as triton_lib
from jalign.specs.base import ConfigError

MODELS = ("generate", "generate_text", "rollout", "refit")
_INT_SETTINGS = ("min_new_tokens", "top_k", "seed")
_FLOAT_SETTINGS = ("temperature", "top_p")


def _settings(inputs: dict) -> dict:
  """Sampling settings of a request: the optional scalar inputs it carries."""
  out = {}
  for name in _INT_SETTINGS:
    if inputs.get(name) is not None:
      out[name] = int(inputs[name].reshape(-1)[0])
  for name in _FLOAT_SETTINGS:
    if inputs.get(name) is not None:
      out[name] = float(inputs[name].reshape(-1)[0])
  if inputs.get("greedy") is not None:
    out["greedy"] = bool(inputs["greedy"].reshape(-1)[0])
  if inputs.get("stop_ids") is not None:
    out["stop_ids"] = [int(i) for i in inputs["stop_ids"].reshape(-1)]
  return out


def bind(triton, job, lock: threading.Lock | None = None, *, max_request_rows: int = 1024):
  """Binds the generation endpoints of ``job`` to a started ``Triton``; ``lock`` serialises calls with
  other models on the same server. Requests of more than ``max_request_rows`` prompts, ids outside the
  vocabulary, bad lengths or settings get a one-line ``BadRequest`` answer."""
  from pytriton.model_config import ModelConfig, Tensor

  lock = lock or threading.Lock()
  vocab = job.vocab_size

  def run(prompts, max_new, inputs):
    settings = _settings(inputs)
    for i in settings.get("stop_ids", ()):
      if not 0 <= i < vocab:
        raise triton_lib.BadRequest(f"stop_ids: {i} is outside the vocabulary of {vocab}")
    try:
      with lock:
        return job.generate(prompts, max_new_tokens=max_new, **settings)
    except ValueError as e:  # jalign.rollout.generate's checks of the settings
      raise triton_lib.BadRequest(str(e)) from None

  @triton_lib.each_request
  def generate_tokens(**inputs):
    tokens, lengths = inputs.pop("tokens"), inputs.pop("sequence_lengths").reshape(-1)
    triton_lib.check_tokens(tokens, vocab, max_rows=max_request_rows)
    if len(lengths) != len(tokens):
      raise triton_lib.BadRequest(f"sequence_lengths: {len(lengths)} lengths for {len(tokens)} rows of tokens")
    triton_lib.check_lengths(lengths, tokens.shape[1])
    max_new = int(inputs.pop("max_new_tokens").reshape(-1)[0])
    out = run([row[:n].tolist() for row, n in zip(tokens, lengths)], max_new, inputs)
    return {"tokens": out.tokens.astype(np.int64), "lengths": out.lengths.astype(np.int64)[:, None],
            "is_end": out.is_end[:, None], "logprobs": out.logprobs.astype(np.float32)}

  @triton_lib.each_request
  def generate_text(**inputs):
    sentences = inputs.pop("sentences").reshape(-1)
    if len(sentences) > max_request_rows:
      raise triton_lib.BadRequest(f"sentences: {len(sentences)} prompts, more than the {max_request_rows} this "
                                  "server takes in one request")
    try:
      texts = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in sentences]
    except UnicodeDecodeError as e:
      raise triton_lib.BadRequest(f"sentences: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [job.encode(t) for t in texts]
    if any(not p for p in prompts):
      raise triton_lib.BadRequest("sentences: an empty prompt")
    out = run(prompts, int(inputs.pop("max_new_tokens").reshape(-1)[0]), inputs)
    replies = [job.decode(r) for r in out.responses()]
    return {"sentences": np.asarray([r.encode("utf-8") for r in replies], dtype=np.bytes_)}

  @triton_lib.each_request
  def rollout(**inputs):
    tokens, lengths = inputs["tokens"], inputs["sequence_lengths"].reshape(-1)
    triton_lib.check_tokens(tokens, vocab, max_rows=max_request_rows)
    if len(lengths) != len(tokens):
      raise triton_lib.BadRequest(f"sequence_lengths: {len(lengths)} lengths for {len(tokens)} rows of tokens")
    triton_lib.check_lengths(lengths, tokens.shape[1])
    try:
      request = Request.from_json(inputs["request"].reshape(-1)[0].decode())
    except (ValueError, TypeError, UnicodeDecodeError) as e:
      raise triton_lib.BadRequest(f"request: not a rollout request ({e})") from None
    for i in request.stop_ids:
      if not 0 <= i < vocab:
        raise triton_lib.BadRequest(f"request: stop id {i} is outside the vocabulary of {vocab}")
    try:
      with lock:
        out = job.rollout([row[:n].tolist() for row, n in zip(tokens, lengths)], request)
    except ValueError as e:
      raise triton_lib.BadRequest(str(e)) from None
    width = max(1, max(len(r) for r in out.responses))
    replies, logprobs = np.zeros((len(tokens), width), np.int64), np.zeros((len(tokens), width), np.float32)
    for b, (r, lp) in enumerate(zip(out.responses, out.logprobs)):
      replies[b, :len(r)], logprobs[b, :len(r)] = r, lp
    return {"tokens": replies, "lengths": np.asarray([[len(r)] for r in out.responses], np.int64),
            "is_end": out.is_end[:, None], "logprobs": logprobs, "version": np.asarray([out.version], np.int64)}

  @triton_lib.each_request
  def refit(**inputs):
    try:
      manifest = refit_lib.decode(inputs["manifest"].reshape(-1)[0])
    except (ValueError, UnicodeDecodeError) as e:
      raise triton_lib.BadRequest(f"manifest: not a refit manifest ({e})") from None
    try:
      with lock:
        done = job.refit(manifest, timeout_s=float(inputs["timeout_s"].reshape(-1)[0]))
    except refit_lib.RefitError as e:
      raise triton_lib.BadRequest(f"refit to version {manifest.get('version')} failed: {e}; serving version "
                                  f"{job.version}") from None
    return {"version": np.asarray([done.version], np.int64), "buckets": np.asarray([done.buckets], np.int64),
            "bytes": np.asarray([done.bytes], np.int64), "seconds": np.asarray([done.seconds], np.float32)}

  scalar = lambda name, dtype: Tensor(name=name, dtype=dtype, shape=(1,), optional=True)  # noqa: E731
  settings = [scalar("min_new_tokens", np.int64), scalar("top_k", np.int64), scalar("seed", np.int64),
              scalar("temperature", np.float32), scalar("top_p", np.float32), scalar("greedy", np.bool_),
              Tensor(name="stop_ids", dtype=np.int64, shape=(-1,), optional=True),
              Tensor(name="max_new_tokens", dtype=np.int64, shape=(1,))]
  whole = ModelConfig(batching=False)
  matrix = lambda name, dtype: Tensor(name=name, dtype=dtype, shape=(-1, -1))  # noqa: E731
  triton.bind(model_name="generate", infer_func=generate_tokens,
              inputs=[matrix("tokens", np.int64), matrix("sequence_lengths", np.int64), *settings],
              outputs=[matrix("tokens", np.int64), matrix("lengths", np.int64), matrix("is_end", np.bool_),
                       matrix("logprobs", np.float32)], config=whole)
  triton.bind(model_name="generate_text", infer_func=generate_text,
              inputs=[Tensor(name="sentences", dtype=np.bytes_, shape=(-1,)), *settings],
              outputs=[Tensor(name="sentences", dtype=np.bytes_, shape=(-1,))], config=whole)
  one = lambda name, dtype: Tensor(name=name, dtype=dtype, shape=(1,))  # noqa: E731
  triton.bind(model_name="rollout", infer_func=rollout,
              inputs=[matrix("tokens", np.int64), matrix("sequence_lengths", np.int64), one("request", np.bytes_)],
              outputs=[matrix("tokens", np.int64), matrix("lengths", np.int64), matrix("is_end", np.bool_),
                       matrix("logprobs", np.float32), one("version", np.int64)], config=whole)
  triton.bind(model_name="refit", infer_func=refit,
              inputs=[one("manifest", np.bytes_), one("timeout_s", np.float32)],
              outputs=[one("version", np.int64), one("buckets", np.int64), one("bytes", np.int64),
                       one("seconds", np.float32)], config=whole)


class RemoteGenerator:
  """The client of a generation server at ``address`` (``host:port``)."""

  def __init__(self, address: str, *, connect_timeout_s: float = 600.0, timeout_s: float = 1800.0):
    self._server = triton_lib.Client(address, timeout_s)
    self.url = self._server.url
    try:
      self._server.wait_for(MODELS, connect_timeout_s)
    except Exception as e:  # unreachable, or not a generation server
      raise ConfigError(f"no generation server answers at {self.url} within {connect_timeout_s:.0f} s "
                        f"({type(e).__name__}: {e}); start one with python -m jalign.serve --config=<config> "
                        "--config.generation.serve=True") from e

  def _call(self, name: str, **inputs) -> dict:
    return self._server.infer(name, **inputs)

  @staticmethod
  def _inputs(max_new_tokens, min_new_tokens, temperature, top_k, top_p, greedy, stop_ids, seed) -> dict:
    out = {"max_new_tokens": np.asarray([max_new_tokens], np.int64),
           "min_new_tokens": np.asarray([min_new_tokens], np.int64), "top_k": np.asarray([top_k], np.int64),
           "seed": np.asarray([seed], np.int64), "temperature": np.asarray([temperature], np.float32),
           "top_p": np.asarray([top_p], np.float32), "greedy": np.asarray([greedy], np.bool_)}
    if stop_ids is not None:
      out["stop_ids"] = np.asarray(list(stop_ids), np.int64)
    return out

  def generate(self, prompts, *, max_new_tokens: int, min_new_tokens: int = 0, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, greedy: bool = False, stop_ids=None, seed: int = 0) -> Rollout:
    """As ``jalign.rollout.generate`` on the served model (``stop_ids`` None: the server's end of
    sequence); the ``Rollout`` holds numpy arrays."""
    tokens, lengths = self._padded(prompts)
    out = self._call("generate", tokens=tokens, sequence_lengths=lengths,
                     **self._inputs(max_new_tokens, min_new_tokens, temperature, top_k, top_p, greedy, stop_ids, seed))
    return Rollout(tokens=out["tokens"], prompt_lengths=lengths[:, 0], lengths=out["lengths"][:, 0],
                   is_end=out["is_end"][:, 0], logprobs=out["logprobs"])

  @staticmethod
  def _padded(prompts) -> tuple[np.ndarray, np.ndarray]:
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    lengths = np.asarray([[len(p)] for p in prompts], np.int64)
    tokens = np.zeros((len(prompts), int(lengths.max())), np.int64)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    return tokens, lengths

  def rollout(self, prompts, request: Request) -> Samples:
    """A served engine's samples of ``prompts`` (``jalign.rollout.sampling``), with their weights' version."""
    tokens, lengths = self._padded(prompts)
    out = self._call("rollout", tokens=tokens, sequence_lengths=lengths,
                     request=np.asarray([request.to_json().encode()], np.bytes_))
    n = out["lengths"][:, 0]
    return Samples(responses=[row[:k].tolist() for row, k in zip(out["tokens"], n)], is_end=out["is_end"][:, 0],
                   logprobs=[row[:k] for row, k in zip(out["logprobs"], n)], version=int(out["version"][0]))

  def refit(self, manifest: dict, *, timeout_s: float) -> dict:
    """Has the server pull the weights ``manifest`` offers (``jalign.rollout.refit``): its answer."""
    out = self._call("refit", manifest=np.asarray([refit_lib.encode(manifest)], np.bytes_),
                     timeout_s=np.asarray([timeout_s], np.float32))
    return {key: value.reshape(-1)[0].item() for key, value in out.items()}

  def generate_text(self, texts: list[str], *, max_new_tokens: int, min_new_tokens: int = 0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                    stop_ids=None, seed: int = 0) -> list[str]:
    """The served model's replies to prompt texts."""
    sentences = np.asarray([t.encode("utf-8") for t in texts], dtype=np.bytes_)
    out = self._call("generate_text", sentences=sentences,
                     **self._inputs(max_new_tokens, min_new_tokens, temperature, top_k, top_p, greedy, stop_ids, seed))
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in out["sentences"].reshape(-1)]
