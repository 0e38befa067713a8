"""Logical axis names and their mapping onto device meshes."""
from sharding.logical_axes import (
    KV_CACHE_AXES,
    LogicalAxes,
)

__all__ = ["KV_CACHE_AXES", "LogicalAxes"]
