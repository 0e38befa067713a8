"""On-disk cache of converted weights (orbax) with their ModelConfig (JSON).

An entry lives in ``<root>/<key>/``: ``weights/`` (an orbax checkpoint of the
LlamaWeights pytree), ``model_config.json`` and ``entry.json`` (written last;
its presence marks a complete entry). ``<root>`` is ``cache_dir``, else
``$ARCTIC_JAX_CACHE``, else ``~/.cache/arctic-jax/converted``. The key hashes
the source files' absolute paths, sizes and modification times, the dtype and
``FORMAT_VERSION``, so an edited source or a new conversion format misses the
cache. Entries are written to a temporary folder and renamed into place.

A corrupt entry (unreadable, incomplete, or of the wrong shapes or dtype) is
reported with a ``CacheCorruptWarning``, deleted and rebuilt. Flipped bits
inside array data are not detected (no checksums).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from arctic_jax.config import ModelConfig, RopeScaling
from arctic_jax.models.llama_weights import (LayerWeights, LlamaWeights, expected_layer_shapes,
                                             expected_model_shapes, validate_weights)

FORMAT_VERSION = 1
ENV_VAR = "ARCTIC_JAX_CACHE"
WEIGHTS_DIR = "weights"
CONFIG_FILE = "model_config.json"
ENTRY_FILE = "entry.json"


class CacheCorruptWarning(UserWarning):
    """A cache entry could not be used and is being rebuilt."""


def default_cache_root() -> str:
    return os.environ.get(ENV_VAR) or os.path.join(
        os.path.expanduser("~"), ".cache", "arctic-jax", "converted")


def cache_key(files: Sequence[str], dtype: Any) -> str:
    """Hex key of the source files (path, size, mtime), dtype and format version."""
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps([FORMAT_VERSION, jnp.dtype(dtype).name, stats], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    return d


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelConfig(**d)


def abstract_weights(cfg: ModelConfig, dtype: Any) -> LlamaWeights:
    """A LlamaWeights of ShapeDtypeStructs on the default device (orbax's restore target).

    The default device honours ``jax.default_device`` (data-parallel replicas load there).
    """
    device = jax.config.jax_default_device or jax.devices()[0]
    if isinstance(device, str):  # the config may name a platform instead of a device
        device = jax.devices(device)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(shape: tuple[int, ...] | None) -> jax.ShapeDtypeStruct | None:
        return None if shape is None else jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    model = expected_model_shapes(cfg)
    layer = expected_layer_shapes(cfg)
    return LlamaWeights(
        embed=spec(model["embed"]), final_norm=spec(model["final_norm"]),
        lm_head=spec(model["lm_head"]),
        layers=tuple(LayerWeights(**{k: spec(s) for k, s in layer.items()})
                     for _ in range(cfg.num_layers)))


def save_entry(entry: str, cfg: ModelConfig, weights: LlamaWeights, dtype: Any) -> None:
    """Write a complete entry at ``entry`` (through a temporary sibling folder)."""
    import orbax.checkpoint as ocp

    parent = os.path.dirname(os.path.abspath(entry))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(entry)}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, WEIGHTS_DIR), weights)
            ckpt.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config_to_dict(cfg), f, indent=1)
        with open(os.path.join(tmp, ENTRY_FILE), "w", encoding="utf-8") as f:
            json.dump({"format_version": FORMAT_VERSION, "dtype": jnp.dtype(dtype).name}, f)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isfile(os.path.join(entry, ENTRY_FILE)):
                raise  # not a concurrent writer that finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_entry(entry: str, dtype: Any) -> tuple[ModelConfig, LlamaWeights]:
    """Read a complete entry; raises on anything missing, unreadable or inconsistent."""
    import orbax.checkpoint as ocp

    with open(os.path.join(entry, ENTRY_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION or meta.get("dtype") != jnp.dtype(dtype).name:
        raise ValueError(f"entry metadata {meta} does not match format {FORMAT_VERSION}, "
                         f"dtype {jnp.dtype(dtype).name}")
    with open(os.path.join(entry, CONFIG_FILE), encoding="utf-8") as f:
        cfg = config_from_dict(json.load(f))
    with ocp.StandardCheckpointer() as ckpt:
        weights = ckpt.restore(os.path.abspath(os.path.join(entry, WEIGHTS_DIR)),
                               abstract_weights(cfg, dtype))
    validate_weights(weights, cfg)
    bad = [x.dtype for x in jax.tree.leaves(weights) if x.dtype != jnp.dtype(dtype)]
    if bad:
        raise ValueError(f"restored arrays have dtype {bad[0]}, expected {jnp.dtype(dtype)}")
    return cfg, weights


def load_or_convert(files: Sequence[str], dtype: Any,
                    convert: Callable[[], tuple[ModelConfig, LlamaWeights]], *,
                    cache_dir: str | os.PathLike | None = None, use_cache: bool = True
                    ) -> tuple[ModelConfig, LlamaWeights, bool]:
    """``(config, weights, from_cache)``: restored from the cache, else converted and saved.

    A failure to write the cache is reported as a warning; the converted
    weights are still returned.
    """
    if not use_cache:
        cfg, weights = convert()
        return cfg, weights, False
    root = os.fspath(cache_dir) if cache_dir is not None else default_cache_root()
    entry = os.path.join(root, cache_key(files, dtype))
    if os.path.exists(entry):
        try:
            cfg, weights = restore_entry(entry, dtype)
            return cfg, weights, True
        except Exception as e:  # any failure to read back means the entry is unusable
            warnings.warn(f"converted-weights cache entry {entry} is corrupt ({e!r}); "
                          "rebuilding it", CacheCorruptWarning, stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)
    cfg, weights = convert()
    try:
        save_entry(entry, cfg, weights, dtype)
    except Exception as e:  # a cache that cannot be written must not fail the load
        warnings.warn(f"could not write converted-weights cache entry {entry}: {e!r}",
                      stacklevel=2)
    return cfg, weights, False
