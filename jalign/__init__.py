"""jalign: a JAX-native toolkit for aligning large language models."""

__version__ = "0.1.0"
