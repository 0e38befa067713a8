"""Checking a checkpoint's HF-named tensors against a model's layout, and converting them.

Both readers present tensors under their HF names in torch layout; the model's
``ModelSpec.layout`` says which tensors (and shapes) a config needs and turns
them into the model's weights pytree. Nothing here knows a model family.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax.numpy as jnp
from tqdm import tqdm

from arctic_jax.config import ModelConfig
from arctic_jax.models.registry import CheckpointLayout
from checkpoints.errors import CheckpointError, tensor_mismatch_error

log = logging.getLogger(__name__)

Reader = Callable[[str], Any]
"""Reads one tensor by HF name, in torch layout (numpy or jax array)."""


def check_tensors(layout: CheckpointLayout, found: Mapping[str, tuple[int, ...]],
                  cfg: ModelConfig, where: str, label: Callable[[str], str] = str) -> None:
    """Raise CheckpointError unless ``found`` (name -> shape) is exactly what ``cfg`` needs.

    Ignored buffers are skipped, tied tensors allowed; ``label`` turns an HF name into the
    name shown in messages (e.g. the GGUF tensor name).
    """
    expected = layout.tensor_shapes(cfg)
    for name, same_as in layout.tied_tensors(cfg).items():
        if name in found:
            expected[name] = expected[same_as]  # checked equal in convert_weights
    unused = layout.unused_tensors(cfg)
    allowed = {**unused, **expected}
    present = {n: tuple(s) for n, s in found.items() if not layout.is_ignored(n)}
    missing = [label(n) for n in expected if n not in present]
    unexpected = [label(n) for n in present if n not in allowed]
    misshaped = [(label(n), allowed[n], s) for n, s in present.items()
                 if n in allowed and s != allowed[n]]
    err = tensor_mismatch_error(where, missing=missing, unexpected=unexpected, misshaped=misshaped)
    if err is not None:
        raise err
    skipped = [label(n) for n in present if n in unused]
    if skipped:
        log.info("%s: skipping %d tensors the model does not use: %s", where, len(skipped),
                 ", ".join(skipped))


def convert_weights(layout: CheckpointLayout, read: Reader, names: Collection[str],
                    cfg: ModelConfig, dtype: Any, *, desc: str, progress: bool = True) -> Any:
    """Convert a checked checkpoint (tensor ``names``) into the model's weights, one tensor
    at a time, with a progress bar on stderr once a load takes more than a second.

    A tied tensor the checkpoint holds must equal its counterpart (CheckpointError if not).
    """
    tied = {n: same_as for n, same_as in layout.tied_tensors(cfg).items() if n in names}
    total = len(layout.tensor_shapes(cfg)) + 2 * len(tied)
    with tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, delay=1.0,
              disable=not progress) as bar:

        def counted(name: str) -> Any:
            out = read(name)
            bar.update(1)
            return out

        for name, same_as in tied.items():
            a, b = jnp.asarray(counted(name)), jnp.asarray(counted(same_as))
            if a.shape != b.shape or not bool(jnp.array_equal(a, b)):
                raise CheckpointError(
                    f"{desc}: the config ties {name} to {same_as}, but {name} differs from "
                    f"{same_as}; set tie_word_embeddings to false to use a separate {name}")
            del a, b
        return layout.convert(counted, cfg, dtype)
