"""Write a random-weight embedding checkpoint of a real shape, for serving benchmarks.

``arctic-jax bench --embeddings --random-weights bert-base`` builds the model in-process; an
HTTP benchmark needs a checkpoint directory that ``arctic-jax serve --model DIR`` can load. This
script writes one: ``config.json`` of the shape, ``model.safetensors`` with random float16
weights (normal, std 0.02; LayerNorm weights near 1), the sentence-transformers files of
snowflake-arctic-embed-m (CLS pooling, L2 normalisation, its query prompt), and the tokenizer
files of ``--tokenizer-from`` (BERT-base shapes use the bert-base-uncased vocabulary of 30,522
word pieces, which all-MiniLM-L6-v2 shares).

    python benchmarks/random_encoder.py --out /tmp/arctic-embed-m-random
    python benchmarks/random_encoder.py --out DIR --tokenizer-from path/to/encoder-checkpoint
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arctic_jax.models.bert_config import BertConfig
from arctic_jax.models.bert_layout import BertLayout

SHAPES = {  # snowflake-arctic-embed-m is BERT-base
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")
QUERY_PROMPT = "Represent this sentence for searching relevant passages: "


def _write_json(path: str, obj: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def tokenizer_source(name: str) -> str:
    """A directory holding a BERT tokenizer: ``all-MiniLM-L6-v2`` (the embedded model) or a path."""
    if name == "all-MiniLM-L6-v2":
        from checkpoints.loader import default_embedding_model_path

        return default_embedding_model_path()
    return name


def hf_config(shape: str, vocab_size: int) -> dict:
    """config.json of a ``BertModel`` of ``shape``."""
    return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab_size,
            "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "pad_token_id": 0, "torch_dtype": "float16",
            **SHAPES[shape]}


def random_tensors(cfg: BertConfig, seed: int) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint, float16, in torch layout."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in BertLayout().tensor_shapes(cfg).items():
        x = rng.standard_normal(shape, dtype=np.float32)
        x = 1.0 + 0.02 * x if "LayerNorm.weight" in name else 0.02 * x
        out[name] = x.astype(np.float16)
    return out


def write_checkpoint(out: str, shape: str, tokenizer_dir: str, seed: int) -> str:
    """Write the checkpoint directory ``out``; returns it."""
    from safetensors.numpy import save_file

    with open(os.path.join(tokenizer_dir, "config.json"), encoding="utf-8") as f:
        vocab_size = int(json.load(f)["vocab_size"])
    config = hf_config(shape, vocab_size)
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "config.json"), config)
    save_file(random_tensors(BertConfig.from_hf_dict(config), seed),
              os.path.join(out, "model.safetensors"))
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]
    if "tokenizer.json" not in copied and "vocab.txt" not in copied:
        raise SystemExit(f"--tokenizer-from {tokenizer_dir}: no tokenizer.json or vocab.txt there")
    for f in copied:
        shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(out, f))
    _write_json(os.path.join(out, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}])
    _write_json(os.path.join(out, "1_Pooling", "config.json"),
                {"word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": True,
                 "pooling_mode_mean_tokens": False})
    _write_json(os.path.join(out, "config_sentence_transformers.json"),
                {"prompts": {"query": QUERY_PROMPT}, "default_prompt_name": None})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--shape", choices=sorted(SHAPES), default="bert-base")
    p.add_argument("--tokenizer-from", default="all-MiniLM-L6-v2",
                   help="all-MiniLM-L6-v2 (the embedded model) or a checkpoint directory with a "
                        "BERT tokenizer and config.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = write_checkpoint(args.out, args.shape, tokenizer_source(args.tokenizer_from), args.seed)
    print(f"wrote a random {args.shape} encoder to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
