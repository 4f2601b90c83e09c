"""Streaming reads and writes of safetensors files with numpy (bfloat16 through ml_dtypes).

Reading reads one tensor when it is asked for, into memory of its own that is freed with it (not a
memory map, whose pages would stay in the process's resident memory until the file is closed);
writing streams one tensor at a time. Neither needs a whole checkpoint in host memory.
Format: 8-byte little-endian header size, a JSON header ``{name: {dtype, shape, data_offsets}}``,
then the raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint file or folder that cannot be read as asked; the message names the file."""


class SafetensorsFile:
  """One safetensors file: its header, and its tensors read on demand."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_file():
      raise CheckpointError(f"{self.path}: file not found")
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise CheckpointError(f"{self.path}: header of {n} bytes runs past the end of the file")
      try:
        header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self.header = header
    self._start = 8 + n
    for name, info in header.items():
      if info["dtype"] not in DTYPES:
        raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
      end = info["data_offsets"][1]
      if self._start + end > size:
        raise CheckpointError(f"{self.path}: tensor {name!r} runs past the end of the file "
                              f"(truncated download?)")

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self.header[name]["dtype"]]

  def get(self, name: str) -> np.ndarray:
    """The tensor, read from disk into a new array."""
    info = self.header[name]
    begin, end = info["data_offsets"]
    dtype = DTYPES[info["dtype"]]
    if end == begin:
      return np.zeros(info["shape"], dtype)
    value = np.fromfile(self.path, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self._start + begin)
    return value.reshape(info["shape"])


class SafetensorsReader:
  """All tensors of a set of safetensors files, by name."""

  def __init__(self, files: Iterable[str | os.PathLike]):
    self.files: dict[str, SafetensorsFile] = {}
    for path in files:
      f = SafetensorsFile(path)
      for name in f.keys():
        if name in self.files:
          raise CheckpointError(f"{path}: tensor {name!r} is also in {self.files[name].path}")
        self.files[name] = f

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def keys(self) -> list[str]:
    return list(self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files[name].shape(name)

  def path(self, name: str) -> Path:
    return self.files[name].path

  def get(self, name: str) -> np.ndarray:
    return self.files[name].get(name)


def write_file_lazy(path, entries, metadata=None) -> None:
  """Write ``(name, shape, dtype, produce)`` entries; ``produce()`` is called once per tensor."""
  header: dict[str, object] = {}
  offset = 0
  for name, shape, dtype, _ in entries:
    dtype = np.dtype(dtype)
    if dtype not in NAMES:
      raise ValueError(f"{path}: cannot write tensor {name!r} of dtype {dtype}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, produce in entries:
      array = np.ascontiguousarray(produce(), dtype=np.dtype(dtype))
      if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
      f.write(array.tobytes())


@contextlib.contextmanager
def new_folder(path, *, overwrite: bool = False):
  """A temporary folder beside ``path`` to write a checkpoint into; it becomes ``path`` when the block
  ends, and is removed if the block fails. A non-empty ``path`` is replaced only with ``overwrite``,
  and kept until the new folder is complete."""
  path = Path(path)
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path}: exists and is not empty (pass overwrite=True to replace it)")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if path.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(tmp, path)
    shutil.rmtree(old)
  else:
    os.replace(tmp, path)
