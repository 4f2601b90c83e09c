"""Rewards computed by code rather than a model: verifiers of math answers and response shape, and the
pool that runs Python reward functions named in a config with a timeout per call.

Every reward function has the signature ``fn(prompt: str, response: str, record: dict) -> float``:
``jalign.rewards.math_answers:final_answer`` (1 when the final answer equals ``record["answer"]``),
``jalign.rewards.shape:think_answer`` (1 for ``<think>..</think><answer>..</answer>``),
``jalign.rewards.shape:concise`` (a penalty past a length budget).
"""
