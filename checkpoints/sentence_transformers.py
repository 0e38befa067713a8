"""Read a checkpoint's sentence-transformers files into a ``PoolingConfig``.

- ``modules.json``: the module pipeline. Supported: a Transformer, one Pooling module, and
  optionally Normalize; any other module (Dense, LayerNorm, ...) is a ConfigError.
- ``<pooling path>/config.json``: the pooling mode, as the legacy ``pooling_mode_*`` flags
  (none set: mean, as sentence-transformers) or the newer ``pooling_mode`` key. cls, mean and
  last token are supported; max, mean_sqrt_len_tokens, weightedmean, combined modes and
  ``include_prompt: false`` are ConfigErrors naming the file.
- ``config_sentence_transformers.json``: ``prompts`` and ``default_prompt_name``.
- ``sentence_bert_config.json``: ``max_seq_length``.
- ``config.json``: ``matryoshka_dimensions`` (a list), or ``is_matryoshka: true`` (any width
  up to the hidden size).

A directory without ``modules.json`` (a plain HF encoder) gets CLS pooling and L2
normalisation (the arctic-embed / BGE convention), plus any prompts and Matryoshka
dimensions its other files declare.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from arctic_jax.models.pooling import PoolingConfig
from checkpoints.errors import ConfigError

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"
POOLING_CONFIG_FILE = "config.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
SBERT_CONFIG_FILE = "sentence_bert_config.json"
HF_CONFIG_FILE = "config.json"

_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
# sentence-transformers mode name -> ours; the others are not supported.
_MODES = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
_LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def read_pooling_config(directory: str | os.PathLike) -> PoolingConfig:
    """The ``PoolingConfig`` of the checkpoint in ``directory`` (see the module docstring).

    Without ``modules.json`` (no sentence-transformers files): CLS pooling, L2-normalised.

    ConfigError, naming the file, for malformed or unsupported sentence-transformers files.
    """
    directory = os.fspath(directory)
    modules_path = os.path.join(directory, MODULES_FILE)
    mode, normalize = "cls", True
    if os.path.isfile(modules_path):
        mode, normalize = _read_modules(directory, modules_path)
    else:
        log.warning("%s has no %s (no sentence-transformers files): CLS pooling, L2-normalised",
                    directory, MODULES_FILE)
    prompts, default_prompt = _read_prompts(os.path.join(directory, ST_CONFIG_FILE))
    max_seq = _read_max_seq_length(os.path.join(directory, SBERT_CONFIG_FILE))
    dims = _read_matryoshka(os.path.join(directory, HF_CONFIG_FILE))
    return PoolingConfig(mode=mode, normalize=normalize, matryoshka_dimensions=dims,
                         prompts=prompts, default_prompt_name=default_prompt,
                         max_seq_length=max_seq)


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _read_modules(directory: str, path: str) -> tuple[str, bool]:
    modules = _load_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                for m in modules):
        raise ConfigError(f"{path}: expected a list of modules, each with a 'type'")
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    unsupported = [m["type"] for m, k in zip(modules, kinds, strict=True)
                   if k not in _SUPPORTED_MODULES]
    if unsupported:
        raise ConfigError(f"{path}: unsupported sentence-transformers modules "
                          f"{', '.join(unsupported)}; supported: {', '.join(_SUPPORTED_MODULES)}")
    pooling = [m for m, k in zip(modules, kinds, strict=True) if k == "Pooling"]
    if len(pooling) != 1:
        raise ConfigError(f"{path}: expected exactly one Pooling module, found {len(pooling)}")
    pooling_path = os.path.join(directory, str(pooling[0].get("path", "")), POOLING_CONFIG_FILE)
    if not os.path.isfile(pooling_path):
        raise ConfigError(f"{path} names a Pooling module whose config {pooling_path} "
                          "does not exist")
    return _read_pooling_mode(pooling_path), "Normalize" in kinds


def _read_pooling_mode(path: str) -> str:
    cfg = _load_json(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    if cfg.get("include_prompt", True) is False:
        raise ConfigError(f"{path}: include_prompt false (prompt tokens left out of pooling) "
                          "is not supported")
    if "pooling_mode" in cfg:
        modes = cfg["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for key, mode in _LEGACY_FLAGS.items() if cfg.get(key, False)] or ["mean"]
    if len(modes) != 1:
        raise ConfigError(f"{path}: combined pooling modes ({', '.join(map(str, modes))}) are not "
                          "supported; one of cls, mean, lasttoken is")
    if modes[0] not in _MODES:
        raise ConfigError(f"{path}: pooling mode {modes[0]!r} is not supported; supported: "
                          f"{', '.join(_MODES)}")
    return _MODES[modes[0]]


def _read_prompts(path: str) -> tuple[dict[str, str], str | None]:
    if not os.path.isfile(path):
        return {}, None
    cfg = _load_json(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ConfigError(f"{path}: prompts must map names to strings")
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ConfigError(f"{path}: default_prompt_name {default!r} is not one of the prompts "
                          f"({', '.join(prompts) or 'none'})")
    return dict(prompts), default


def _read_max_seq_length(path: str) -> int | None:
    if not os.path.isfile(path):
        return None
    cfg = _load_json(path)
    value = cfg.get("max_seq_length") if isinstance(cfg, dict) else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{path}: max_seq_length must be a positive integer, got {value!r}")
    return value


def _read_matryoshka(path: str) -> tuple[int, ...]:
    if not os.path.isfile(path):
        return ()
    cfg = _load_json(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    dims = cfg.get("matryoshka_dimensions")
    hidden = cfg.get("hidden_size")
    if dims is None:
        if cfg.get("is_matryoshka") and isinstance(hidden, int):
            return tuple(range(1, hidden + 1))
        return ()
    if not isinstance(dims, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ConfigError(f"{path}: matryoshka_dimensions must be a list of positive integers, "
                          f"got {dims!r}")
    if isinstance(hidden, int) and any(d > hidden for d in dims):
        raise ConfigError(f"{path}: matryoshka_dimensions {dims} exceed hidden_size {hidden}")
    return tuple(dims)
