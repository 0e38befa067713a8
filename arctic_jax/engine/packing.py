"""One host-to-device transfer per step: a pytree of small 4-byte arrays packed into one buffer.

``pack`` flattens the leaves into a single int32 numpy vector and returns the
static ``PackedLayout`` that ``unpack`` (inside jit) uses to slice and bitcast
them back. The layout is hashable, so it serves as a static jit argument.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    treedef: Any                                   # jax PyTreeDef (hashable)
    leaves: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype name) per leaf

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in self.leaves)


def pack(tree: Any) -> tuple[np.ndarray, PackedLayout]:
    """Flatten a pytree of int32/uint32/float32 numpy arrays into one int32 vector."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    parts, specs = [], []
    for leaf in leaves:
        a = np.asarray(leaf)
        if a.dtype.itemsize != 4:
            raise TypeError(f"can only pack 4-byte dtypes, got {a.dtype}")
        parts.append(np.ascontiguousarray(a).reshape(-1).view(np.int32))
        specs.append((a.shape, a.dtype.name))
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return flat, PackedLayout(treedef=treedef, leaves=tuple(specs))


def unpack(flat: jax.Array, layout: PackedLayout) -> Any:
    """Inverse of ``pack`` on the device."""
    out, offset = [], 0
    for shape, dtype in layout.leaves:
        n = int(np.prod(shape, dtype=np.int64))
        piece = flat[offset:offset + n].reshape(shape)
        if dtype != "int32":
            piece = jax.lax.bitcast_convert_type(piece, jnp.dtype(dtype))
        out.append(piece)
        offset += n
    return jax.tree_util.tree_unflatten(layout.treedef, out)
