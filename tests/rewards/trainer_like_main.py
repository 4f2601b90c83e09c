"""A main module that imports jax, as ``python -m jalign.train``'s does, then scores one item with a pool
of workers running ``sample_functions:jax_imported`` and prints the reward."""

import jax

from jalign.rewards import functions

if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  pool = functions.RewardPool([functions.parse("tests.rewards.sample_functions:jax_imported")], workers=1)
  try:
    print(pool.score([functions.Item("q", "a", {}, "data.jsonl:1")])[0][0])
  finally:
    pool.close()
