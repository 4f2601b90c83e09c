"""Models: the Llama-family decoder, value heads, and checkpoint readers and writers."""

from jalign.models.llama import KVCache, LlamaConfig, RopeScaling, Transformer

__all__ = ["KVCache", "LlamaConfig", "RopeScaling", "Transformer"]
