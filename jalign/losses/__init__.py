"""Alignment algorithms as pure functions: losses and jitted step builders, one file each."""
