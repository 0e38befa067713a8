"""On-disk cache of converted weights (orbax) with their ModelConfig (JSON).

An entry lives in ``<root>/<key>/``: ``weights/`` (an orbax checkpoint of the
model's weights pytree), ``model_config.json`` and ``entry.json`` (the model's
registered name, the dtype and format; written last, its presence marks a
complete entry). The caller names the model's ``ModelSpec``: its
``random_weights``, traced abstractly, gives orbax the tree to restore into. ``<root>`` is
``cache_dir``, else ``<cache root>/converted`` (``$ARCTIC_JAX_CACHE`` or ``~/.cache/arctic-jax``,
see ``arctic_jax.cache_root``). The key hashes
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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.cache_root import cache_dir
from arctic_jax.config import ModelConfig, RopeScaling
from arctic_jax.models.registry import ModelSpec, spec_by_name

FORMAT_VERSION = 2
WEIGHTS_DIR = "weights"
CONFIG_FILE = "model_config.json"
ENTRY_FILE = "entry.json"


class CacheCorruptWarning(UserWarning):
    """A cache entry could not be used and is being rebuilt."""


def default_cache_root() -> str:
    """``<cache root>/converted`` (``arctic_jax.cache_root``)."""
    return cache_dir("converted")


def cache_key(files: Sequence[str], dtype: Any) -> str:
    """Hex key of the source files (path, size, mtime), dtype and format version."""
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps([FORMAT_VERSION, jnp.dtype(dtype).name, stats], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A model config dataclass (a ModelConfig, or e.g. a BertConfig) as a JSON-able dict."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any], config_class: type = ModelConfig) -> Any:
    """The inverse of ``config_to_dict`` for ``config_class``."""
    d = dict(d)
    if "rope_scaling" in d:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if "eos_token_ids" in d:
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return config_class(**d)


def default_sharding() -> jax.sharding.SingleDeviceSharding:
    """The default device (``jax.default_device`` honoured) as a sharding."""
    device = jax.config.jax_default_device or jax.devices()[0]
    if isinstance(device, str):  # the config may name a platform instead of a device
        device = jax.devices(device)[0]
    return jax.sharding.SingleDeviceSharding(device)


def commit(weights: Any) -> Any:
    """Converted ``weights`` committed to the default device, as ``restore_entry`` returns
    them: jit lowers committed and uncommitted arguments to different programs, so a start
    that converts and one that restores would otherwise miss each other's compiled programs
    in the persistent compilation cache."""
    return jax.device_put(weights, default_sharding())


def abstract_weights(spec: ModelSpec, cfg: ModelConfig, dtype: Any) -> Any:
    """The weights pytree of ``spec`` for ``cfg`` as ShapeDtypeStructs on the default device
    (orbax's restore target); nothing is allocated.

    The default device honours ``jax.default_device`` (data-parallel replicas load there).
    """
    sharding = default_sharding()
    # the key too is made under eval_shape: made eagerly, it would run (and, the first time,
    # compile) a program on every start
    shapes = jax.eval_shape(lambda: spec.random_weights(cfg, jax.random.key(0),
                                                       dtype=jnp.dtype(dtype)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes)


def _entry_meta(spec: ModelSpec, dtype: Any) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "model": spec.name, "dtype": jnp.dtype(dtype).name}


def save_entry(entry: str, spec: ModelSpec, cfg: ModelConfig, weights: Any, dtype: Any) -> None:
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
            json.dump(_entry_meta(spec, dtype), f)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isfile(os.path.join(entry, ENTRY_FILE)):
                raise  # not a concurrent writer that finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_entry(entry: str, spec: ModelSpec, dtype: Any) -> tuple[ModelConfig, Any]:
    """Read a complete entry; raises on anything missing, unreadable or inconsistent."""
    import orbax.checkpoint as ocp

    with open(os.path.join(entry, ENTRY_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta != _entry_meta(spec, dtype):
        raise ValueError(f"entry metadata {meta} does not match {_entry_meta(spec, dtype)}")
    with open(os.path.join(entry, CONFIG_FILE), encoding="utf-8") as f:
        cfg = config_from_dict(json.load(f), spec.config_class)
    # the synchronous checkpointer: StandardCheckpointer's async machinery costs a few tenths of
    # a second of every warm start and buys nothing for a restore
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckpt:
        weights = ckpt.restore(os.path.abspath(os.path.join(entry, WEIGHTS_DIR)),
                               args=ocp.args.StandardRestore(abstract_weights(spec, cfg, dtype)))
    spec.validate_weights(weights, cfg)
    bad = [x.dtype for x in jax.tree.leaves(weights) if x.dtype != jnp.dtype(dtype)]
    if bad:
        raise ValueError(f"restored arrays have dtype {bad[0]}, expected {jnp.dtype(dtype)}")
    return cfg, weights


def cached_spec(files: Sequence[str], dtype: Any, cache_dir: str | os.PathLike | None = None
                ) -> ModelSpec | None:
    """The registered model of the complete cache entry for ``files`` and ``dtype``, or None.

    Lets a warm start skip reading the source's metadata (a GGUF file's takes seconds to
    parse); ``restore_entry`` still checks the entry against the spec it returns.
    """
    root = os.fspath(cache_dir) if cache_dir is not None else default_cache_root()
    try:
        with open(os.path.join(root, cache_key(files, dtype), ENTRY_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format_version") != FORMAT_VERSION:
            return None
        return spec_by_name(meta["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no entry, or one load_or_convert will report and rebuild


def load_or_convert(files: Sequence[str], spec: ModelSpec, dtype: Any,
                    convert: Callable[[], tuple[ModelConfig, Any]], *,
                    cache_dir: str | os.PathLike | None = None, use_cache: bool = True
                    ) -> tuple[ModelConfig, Any, bool]:
    """``(config, weights, from_cache)``: restored from the cache, else converted and saved.

    ``spec`` is the model of the source ``files``; ``convert()`` builds its weights.

    A failure to write the cache is reported as a warning; the converted
    weights are still returned.
    """
    if not use_cache:
        cfg, weights = convert()
        return cfg, commit(weights), False
    root = os.fspath(cache_dir) if cache_dir is not None else default_cache_root()
    entry = os.path.join(root, cache_key(files, dtype))
    if os.path.exists(entry):
        try:
            cfg, weights = restore_entry(entry, spec, dtype)
            return cfg, weights, True
        except Exception as e:  # any failure to read back means the entry is unusable
            warnings.warn(f"converted-weights cache entry {entry} is corrupt ({e!r}); "
                          "rebuilding it", CacheCorruptWarning, stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)
    cfg, weights = convert()
    weights = commit(weights)
    try:
        save_entry(entry, spec, cfg, weights, dtype)
    except Exception as e:  # a cache that cannot be written must not fail the load
        warnings.warn(f"could not write converted-weights cache entry {entry}: {e!r}",
                      stacklevel=2)
    return cfg, weights, False
