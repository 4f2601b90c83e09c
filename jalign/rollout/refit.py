"""Refitting a served engine: the actor's generation copy of the weights, device to device, in buckets.

The actor (``Offer``) runs a ``jax.experimental.transfer`` server of its own and offers each bucket of
its generation copy under an id of its own; the generation server pulls the buckets one after another
from that address into arrays laid out as its own weights are (``pull_weights``). A manifest (plain
JSON, sent with the refit call) says what each bucket holds: the weights' paths, shapes, dtypes, partition
specs and shard shapes, the actor's mesh, and the version (the trainer's step) they are.

A refit is atomic: as each bucket lands, the server's old arrays of that bucket go to host memory, so
that its devices never hold more than one bucket beyond one copy of the weights; when a pull fails or
does not finish in time (the actor died, the network broke) the old arrays come back from the host and
the server goes on serving the version it had. Transfer moves arrays shard to shard: the actor lays out
its copy in shards of the server's (the same mesh shape and generation rules), which the manifest lets
the server check before it pulls anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import socket
import threading
import time

import jax
from jax.experimental import transfer


class RefitError(RuntimeError):
  """A refit that did not happen; the server serves the weights it had."""


def start_server(host: str):
  """A transfer server of this process's devices, listening on ``host`` (a port the system picks)."""
  return transfer.start_transfer_server(jax.devices()[0].client, f"{host}:0", [f"{host}:0"])


def host_facing(address: str) -> str:
  """This machine's address on the route to ``address`` (``host:port``): what a peer there can reach."""
  host, _, port = address.rpartition(":")
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent: the route is looked up
    s.connect((host, int(port or 1)))
    return s.getsockname()[0]


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def describe(leaves_with_paths) -> list[dict]:
  """Each weight's path, shape, dtype, partition spec, shard shape and device count (the transfer moves
  shards to shards: both sides must agree on all but the spec, which names their own mesh's axes)."""
  out = []
  for keys, x in leaves_with_paths:
    spec = getattr(x.sharding, "spec", None)
    out.append({"path": _path(keys), "shape": list(x.shape), "dtype": str(x.dtype),
                "spec": None if spec is None else [list(a) if isinstance(a, tuple) else a for a in spec],
                "shard": list(x.sharding.shard_shape(x.shape)), "devices": len(x.sharding.device_set)})
  return out


def mesh_shape(arrays) -> dict:
  mesh = getattr(arrays[0].sharding, "mesh", None) if arrays else None
  return {} if mesh is None else {name: int(size) for name, size in mesh.shape.items()}


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
  """Consecutive weights grouped into buckets of at most ``bucket_bytes`` (a larger weight alone)."""
  buckets, current, filled = [], [], 0
  for i, size in enumerate(sizes):
    if current and filled + size > bucket_bytes:
      buckets.append(current)
      current, filled = [], 0
    current.append(i)
    filled += size
  return buckets + ([current] if current else [])


_ids = itertools.count(int(time.time() * 1000) % (1 << 40) << 16)  # ids unique to this process's offers


class Offer:
  """The actor's side: offers generation copies for the generation server at ``server_address`` to
  pull, from a transfer server on this machine's address facing it."""

  def __init__(self, server_address: str):
    self.server = start_server(host_facing(server_address))
    self.address = self.server.address()

  def offer(self, state, version: int, bucket_bytes: int) -> dict:
    """Offers the arrays of ``state`` (the generation copy's pytree) in buckets; the manifest of them."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = [x for _, x in flat]
    sizes = [x.nbytes for x in arrays]
    buckets = []
    for indices in plan_buckets(sizes, bucket_bytes):
      uuid = next(_ids)
      self.server.await_pull(uuid, [arrays[i] for i in indices])
      buckets.append({"uuid": uuid, "leaves": indices, "bytes": sum(sizes[i] for i in indices)})
    return {"version": int(version), "address": self.address, "weights": describe(flat),
            "mesh": mesh_shape(arrays), "buckets": buckets}


@dataclasses.dataclass
class Pulled:
  version: int
  seconds: float
  bytes: int
  buckets: int


def _pull(connection, uuid: int, specs: list, deadline: float):
  """One bucket, landed, or ``RefitError`` when it fails or is not there by ``deadline`` (a pull's arrays
  come before their bytes, and those of an offer that never comes never do: the wait is left in a
  thread of its own)."""
  outcome = {}

  def run():
    try:
      outcome["arrays"] = jax.block_until_ready(connection.pull(uuid, specs))
    except Exception as e:  # noqa: BLE001 - handed to the caller's thread
      outcome["error"] = e
  thread = threading.Thread(target=run, name=f"refit:{uuid}", daemon=True)
  thread.start()
  thread.join(max(0.0, deadline - time.monotonic()))
  if thread.is_alive():
    raise RefitError("the actor did not hand over every bucket in time")
  if "error" in outcome:
    reason = str(outcome["error"]).strip().splitlines()[0]
    raise RefitError(f"a pull failed ({reason})")
  return outcome["arrays"]


def check(manifest: dict, mine: list[dict], mesh: dict) -> None:
  """``RefitError`` unless the manifest's weights are this server's (``describe``d) over a mesh like its."""
  theirs = manifest["weights"]
  if len(theirs) != len(mine):
    raise RefitError(f"the actor sends {len(theirs)} weights, this server's model has {len(mine)}")
  for a, b in zip(theirs, mine):
    if (a["path"], a["shape"], a["dtype"]) != (b["path"], b["shape"], b["dtype"]):
      raise RefitError(f"the actor's {a['path']} is {a['dtype']}{a['shape']}, this server's {b['path']} is "
                       f"{b['dtype']}{b['shape']}")
    if (a["shard"], a["devices"]) != (b["shard"], b["devices"]):  # shards move to shards of the same shape
      raise RefitError(f"the actor lays out {a['path']} as {a['spec']} over mesh {manifest['mesh']}, this server as "
                       f"{b['spec']} over {mesh}: serve with the actor's mesh and generation rules")


def pull_weights(weights: list, manifest: dict, *, timeout_s: float, connect) -> Pulled:
  """Replaces the arrays of ``weights`` (this server's, in the order the actor flattens its copy, already
  ``check``ed against the manifest) by the manifest's version, bucket by bucket, pulled through
  ``connect(address)``. The replaced arrays wait in host memory until every bucket is in; when a pull
  fails, they go back and ``RefitError`` says why: ``weights`` then holds what it held."""
  began = time.monotonic()
  deadline = began + timeout_s
  saved: dict[int, tuple] = {}  # index -> (the old array in host memory, its sharding)
  try:
    connection = connect(manifest["address"])
    for bucket in manifest["buckets"]:
      indices = bucket["leaves"]
      specs = [jax.ShapeDtypeStruct(weights[i].shape, weights[i].dtype, sharding=weights[i].sharding)
               for i in indices]
      pulled = _pull(connection, bucket["uuid"], specs, deadline)
      for i, x in zip(indices, pulled):
        saved[i] = (jax.device_get(weights[i]), weights[i].sharding)
        weights[i] = x  # the old array's device memory goes with its last reference
  except Exception as e:
    for i, (host, sharding) in saved.items():  # the version it had, back on the devices
      weights[i] = jax.device_put(host, sharding)
    if isinstance(e, RefitError):
      raise
    raise RefitError(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
  return Pulled(version=int(manifest["version"]), seconds=time.monotonic() - began,
                bytes=sum(b["bytes"] for b in manifest["buckets"]), buckets=len(manifest["buckets"]))


def encode(manifest: dict) -> bytes:
  return json.dumps(manifest).encode()


def decode(data: bytes) -> dict:
  return json.loads(data.decode())
