"""Logical axis names and their mapping onto device meshes."""
from sharding.logical_axes import (  # noqa: F401
    KV_CACHE_AXES,
    LogicalAxes,
)
