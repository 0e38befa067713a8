"""Where a BERT checkpoint keeps its tensors: HF names and torch shapes.

Names are relative to ``cfg.tensor_prefix`` (``""`` for ``BertModel``, ``"bert."`` for
``BertForMaskedLM``). ``LAYOUT.convert`` turns the torch-layout tensors into ``BertWeights``:

- ``attention.self.{query,key,value}.weight`` [N*D, H] each -> ``qkv`` [H, 3, N, D]
- ``attention.self.{query,key,value}.bias`` [N*D] each      -> ``qkv_bias`` [3, N, D]
- ``attention.output.dense.weight`` [H, N*D]                -> ``o_proj`` [N, D, H]
- ``intermediate.dense.weight`` [I, H]                      -> ``up`` [H, I]
- ``output.dense.weight`` [H, I]                            -> ``down`` [I, H]
- ``embeddings.{word,position,token_type}_embeddings.weight`` -> ``*_embed`` as stored

The pooler (``pooler.dense.*``) and the masked-LM / pre-training heads (``cls.*``) may be
present: their shapes are checked, they are skipped and logged (``unused_tensors``).
``embeddings.position_ids`` / ``embeddings.token_type_ids`` are index buffers (ignored).
BERT has no GGUF support here: the GGUF methods raise ConfigError.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.config import ConfigError
from arctic_jax.models.bert_config import BertConfig
from arctic_jax.models.bert_weights import BertLayerWeights, BertWeights
from arctic_jax.models.llama_layout import TensorReader

WORD_EMBED = "embeddings.word_embeddings.weight"
POSITION_EMBED = "embeddings.position_embeddings.weight"
TYPE_EMBED = "embeddings.token_type_embeddings.weight"
EMBED_NORM = "embeddings.LayerNorm"

IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")

_NO_GGUF = ("GGUF files of BERT models are not supported; load the model's Hugging Face "
            "safetensors directory instead")


def layer_prefix(cfg: BertConfig, i: int) -> str:
    return f"{cfg.tensor_prefix}encoder.layer.{i}."


def layer_tensor_shapes(cfg: BertConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Torch-layout shapes of encoder layer ``i``'s tensors."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    p = layer_prefix(cfg, i)
    shapes: dict[str, tuple[int, ...]] = {}
    for proj in ("query", "key", "value"):
        shapes.update({f"{p}attention.self.{proj}.weight": (H, H),
                       f"{p}attention.self.{proj}.bias": (H,)})
    shapes.update({
        p + "attention.output.dense.weight": (H, H), p + "attention.output.dense.bias": (H,),
        p + "attention.output.LayerNorm.weight": (H,), p + "attention.output.LayerNorm.bias": (H,),
        p + "intermediate.dense.weight": (I, H), p + "intermediate.dense.bias": (I,),
        p + "output.dense.weight": (H, I), p + "output.dense.bias": (H,),
        p + "output.LayerNorm.weight": (H,), p + "output.LayerNorm.bias": (H,),
    })
    return shapes


class BertLayout:
    """The tensor-name layout of BERT checkpoints (see the module docstring)."""

    def tensor_shapes(self, cfg: BertConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint for ``cfg`` must hold, in torch layout."""
        H, b = cfg.hidden_size, cfg.tensor_prefix
        shapes: dict[str, tuple[int, ...]] = {
            b + WORD_EMBED: (cfg.vocab_size, H),
            b + POSITION_EMBED: (cfg.max_position_embeddings, H),
            b + TYPE_EMBED: (cfg.type_vocab_size, H),
            b + EMBED_NORM + ".weight": (H,),
            b + EMBED_NORM + ".bias": (H,),
        }
        for i in range(cfg.num_layers):
            shapes.update(layer_tensor_shapes(cfg, i))
        return shapes

    def tied_tensors(self, cfg: BertConfig) -> dict[str, str]:
        """None: the masked-LM decoder (tied to the word embeddings) is an unused tensor."""
        return {}

    def unused_tensors(self, cfg: BertConfig) -> dict[str, tuple[int, ...]]:
        """The pooler and the ``cls.*`` heads of BertForMaskedLM / BertForPreTraining."""
        H, V = cfg.hidden_size, cfg.vocab_size
        b = cfg.tensor_prefix
        t = "cls.predictions.transform."
        return {
            b + "pooler.dense.weight": (H, H), b + "pooler.dense.bias": (H,),
            t + "dense.weight": (H, H), t + "dense.bias": (H,),
            t + "LayerNorm.weight": (H,), t + "LayerNorm.bias": (H,),
            "cls.predictions.decoder.weight": (V, H), "cls.predictions.decoder.bias": (V,),
            "cls.predictions.bias": (V,),
            "cls.seq_relationship.weight": (2, H), "cls.seq_relationship.bias": (2,),
        }

    def is_ignored(self, name: str) -> bool:
        return name.endswith(IGNORED_SUFFIXES)

    def convert(self, read: TensorReader, cfg: BertConfig, dtype: Any) -> BertWeights:
        """Read every tensor of ``tensor_shapes(cfg)`` once and build BertWeights in ``dtype``."""
        b = cfg.tensor_prefix

        def get(name: str) -> jax.Array:
            return jnp.asarray(read(name)).astype(dtype)

        return BertWeights(
            word_embed=get(b + WORD_EMBED),
            position_embed=get(b + POSITION_EMBED),
            type_embed=get(b + TYPE_EMBED),
            embed_norm=get(b + EMBED_NORM + ".weight"),
            embed_norm_bias=get(b + EMBED_NORM + ".bias"),
            layers=tuple(_layer_weights(get, cfg, i) for i in range(cfg.num_layers)),
        )

    # GGUF (llama.cpp) files: not supported for BERT.

    def hf_name_of_gguf(self, gguf_name: str) -> str | None:
        raise ConfigError(_NO_GGUF)

    def gguf_name_of_hf(self, hf_name: str) -> str | None:
        return None

    def from_gguf(self, gguf_name: str, w: np.ndarray, cfg: BertConfig) -> np.ndarray:
        raise ConfigError(_NO_GGUF)

    def gguf_rope_parameters(self, rope_freqs: np.ndarray, hf: Mapping[str, Any],
                             original_context: int | None) -> dict[str, Any]:
        raise ConfigError(_NO_GGUF)


LAYOUT = BertLayout()


def _layer_weights(get: Any, cfg: BertConfig, i: int) -> BertLayerWeights:
    H, N, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    p = layer_prefix(cfg, i)
    a = p + "attention."
    projs = ("query", "key", "value")
    return BertLayerWeights(
        qkv=jnp.stack([get(f"{a}self.{n}.weight").T.reshape(H, N, D) for n in projs], axis=1),
        qkv_bias=jnp.stack([get(f"{a}self.{n}.bias").reshape(N, D) for n in projs], axis=0),
        o_proj=get(a + "output.dense.weight").T.reshape(N, D, H),
        o_bias=get(a + "output.dense.bias"),
        attn_norm=get(a + "output.LayerNorm.weight"),
        attn_norm_bias=get(a + "output.LayerNorm.bias"),
        up=get(p + "intermediate.dense.weight").T,
        up_bias=get(p + "intermediate.dense.bias"),
        down=get(p + "output.dense.weight").T,
        down_bias=get(p + "output.dense.bias"),
        mlp_norm=get(p + "output.LayerNorm.weight"),
        mlp_norm_bias=get(p + "output.LayerNorm.bias"),
    )
