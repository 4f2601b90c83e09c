"""Meshes, the logical-axis rules table and multi-host start-up."""

from jalign.parallel.logical import active_mesh, constrain, logical_to_spec

__all__ = ["active_mesh", "constrain", "logical_to_spec"]
