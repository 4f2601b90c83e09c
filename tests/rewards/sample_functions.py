"""Reward functions for the pool's tests: well behaved and not."""

import math
import os
import time


def length(prompt, response, record):
  return float(len(response))


def raises(prompt, response, record):
  raise ValueError(f"cannot grade {record['id']}")


def hangs(prompt, response, record):
  if record.get("hang"):
    time.sleep(3600)
  return 1.0


def nan(prompt, response, record):
  return math.nan


def text(prompt, response, record):
  return "1.0"


def exits(prompt, response, record):
  os._exit(3)


def even_length(prompt, response, record):
  """The response's length for problems with an even answer; 0 for the others (a group of an odd
  answer scores all the same)."""
  return float(len(response)) if int(record["answer"]) % 2 == 0 else 0.0


def jax_imported(prompt, response, record):
  """1 if the worker process has imported jax (which none of these functions needs), else 0."""
  import sys
  return float("jax" in sys.modules)
