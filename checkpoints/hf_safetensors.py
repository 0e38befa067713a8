"""Read a Hugging Face checkpoint directory (config.json + safetensors) of a registered model.

The model's spec comes from ``config.json`` (``arctic_jax.models.registry``).
Supports a single ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Tensors are read one at a time with
safetensors' ``flax`` framework (numpy has no bfloat16), converted on the
default device and never held twice in full.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.models import registry
from checkpoints import hf_layout
from checkpoints.errors import CheckpointError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def is_hf_checkpoint_dir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def _read_config_dict(directory: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return path, d


def read_hf_spec(directory: str | os.PathLike) -> registry.ModelSpec:
    """The registered model of ``directory/config.json`` (ConfigError names the file)."""
    path, d = _read_config_dict(directory)
    try:
        return registry.spec_for_hf_config(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def read_hf_config(directory: str | os.PathLike) -> tuple[registry.ModelSpec, ModelConfig]:
    """The model spec and ModelConfig of ``directory/config.json`` (ConfigError names the file)."""
    path, d = _read_config_dict(directory)
    try:
        spec = registry.spec_for_hf_config(d)
        return spec, spec.parse_config(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _read_index(directory: str) -> dict[str, str]:
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors index: {e!r}") from e
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map is not a mapping")
    return weight_map


def weight_files(directory: str | os.PathLike) -> list[str]:
    """Paths of the safetensors files the checkpoint in ``directory`` uses."""
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, INDEX_FILE)):
        names = sorted(set(_read_index(directory).values()))
        return [os.path.join(directory, n) for n in names]
    if os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        return [os.path.join(directory, SINGLE_FILE)]
    raise CheckpointError(
        f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} "
        "(only safetensors checkpoints are supported)")


def source_files(directory: str | os.PathLike) -> list[str]:
    """Every file whose contents decide the loaded model (for cache keys)."""
    directory = os.fspath(directory)
    files = [os.path.join(directory, CONFIG_FILE)]
    if os.path.isfile(os.path.join(directory, INDEX_FILE)):
        files.append(os.path.join(directory, INDEX_FILE))
    return files + weight_files(directory)


class SafetensorsSet:
    """Open safetensors files viewed as one name -> tensor mapping."""

    def __init__(self, directory: str, stack: contextlib.ExitStack,
                 is_ignored: Callable[[str], bool] = lambda name: False):
        from safetensors import safe_open

        self.directory = directory
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        index = (_read_index(directory) if os.path.isfile(os.path.join(directory, INDEX_FILE))
                 else None)
        for path in weight_files(directory):
            if not os.path.isfile(path):
                raise CheckpointError(f"safetensors file {path} does not exist")
            try:
                handle = stack.enter_context(safe_open(path, framework="flax"))
                names = list(handle.keys())
                infos = {n: handle.get_slice(n) for n in names}
                shapes = {n: tuple(int(d) for d in s.get_shape()) for n, s in infos.items()}
                dtypes = {n: s.get_dtype() for n, s in infos.items()}
            except Exception as e:  # safetensors raises its own SafetensorError type
                raise CheckpointError(f"{path} is truncated or corrupt: {e}") from e
            for n in names:
                if n in self._file_of:
                    raise CheckpointError(
                        f"tensor {n} is in both {self._file_of[n]} and {path}")
                if dtypes[n] not in FLOAT_DTYPES and not is_ignored(n):
                    raise CheckpointError(
                        f"tensor {n} in {path} has dtype {dtypes[n]}; supported: "
                        f"{', '.join(FLOAT_DTYPES)} (quantised safetensors are not)")
                self._file_of[n], self._handles[n], self.shapes[n] = path, handle, shapes[n]
        if index is not None:
            for n, fname in index.items():
                path = os.path.join(directory, fname)
                if self._file_of.get(n) != path:
                    raise CheckpointError(
                        f"{os.path.join(directory, INDEX_FILE)} puts tensor {n} in {path}, "
                        f"which does not hold it")

    def read(self, name: str) -> jax.Array:
        try:
            return self._handles[name].get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"cannot read tensor {name} from {self._file_of[name]}: {e}") from e


@contextlib.contextmanager
def open_safetensors(directory: str | os.PathLike,
                     is_ignored: Callable[[str], bool] = lambda name: False
                     ) -> Iterator[SafetensorsSet]:
    """The safetensors of ``directory``; ``is_ignored`` names buffers whose dtype is not checked."""
    with contextlib.ExitStack() as stack:
        yield SafetensorsSet(os.fspath(directory), stack, is_ignored)


def load_hf_checkpoint(directory: str | os.PathLike, dtype: Any, *, progress: bool = True
                       ) -> tuple[ModelConfig, Any]:
    """Config and weights pytree (in ``dtype``) of the HF checkpoint in ``directory``.

    Raises CheckpointError listing missing, unexpected and misshaped tensors,
    and ConfigError for configs arctic-jax cannot serve.
    """
    directory = os.fspath(directory)
    spec, cfg = read_hf_config(directory)
    layout = spec.layout
    with open_safetensors(directory, layout.is_ignored) as tensors:
        hf_layout.check_tensors(layout, tensors.shapes, cfg, where=directory)
        weights = hf_layout.convert_weights(
            layout, tensors.read, tensors.shapes.keys(), cfg, dtype,
            desc=f"converting {os.path.basename(os.path.abspath(directory))}",
            progress=progress)
    return cfg, weights
