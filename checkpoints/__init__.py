"""Model checkpoints: HF safetensors directories and GGUF files -> a registered model's weights.

``load_model`` is the entry point; converted weights are cached with orbax.
"""
from checkpoints.errors import CheckpointError, ConfigError
from checkpoints.loader import LoadedModel, TokenizerSource, default_model_path, load_model

__all__ = ["CheckpointError", "ConfigError", "LoadedModel", "TokenizerSource",
           "default_model_path", "load_model"]
