"""The persistent compilation cache (``arctic_jax.engine.compilation_cache``).

The directory key names the jax/jaxlib versions, backend and device kind; the settings
"auto", "none" and a path resolve as documented. End to end, in fresh interpreters sharing
one cache root: a tiny random Llama engine and a tiny random BERT ``Embedder`` compile their
programs on the first start and load every one of them from the cache on the second (none
compiled), with identical outputs; "none" compiles them again and writes nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from arctic_jax.engine import compilation_cache as cc
from helpers import REPO_ROOT, server_env


# ------------------------------------------------------------------ key and settings
def test_cache_key_names_jax_backend_and_device():
    key = cc.cache_key("0.10.2", "0.10.2", "cpu", "cpu")
    assert key == "jax-0.10.2_jaxlib-0.10.2_cpu_cpu"
    others = {cc.cache_key("0.11.2", "0.10.2", "cpu", "cpu"),
              cc.cache_key("0.10.2", "0.11.2", "cpu", "cpu"),
              cc.cache_key("0.10.2", "0.10.2", "gpu", "cpu"),
              cc.cache_key("0.10.2", "0.10.2", "cpu", "NVIDIA H100 80GB HBM3"),
              cc.cache_key("0.10.2", "0.10.2", "cpu", "NVIDIA H200")}
    assert key not in others and len(others) == 5
    gpu = cc.cache_key("0.11.2", "0.11.2", "gpu", "NVIDIA H100 80GB HBM3")
    assert gpu == "jax-0.11.2_jaxlib-0.11.2_gpu_NVIDIA-H100-80GB-HBM3"
    assert os.sep not in cc.cache_key("1", "1", "cpu", "a/b\\c d")
    with pytest.raises(ValueError, match="device_kind is empty"):
        cc.cache_key("0.10.2", "0.10.2", "cpu", " ")


def test_settings_resolve_to_a_directory_or_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCTIC_JAX_CACHE", str(tmp_path))
    auto = str(tmp_path / "xla" / cc.current_cache_key())
    assert cc.default_cache_dir() == auto
    resolve = cc.resolve_cache_dir
    assert resolve("auto", jax_dir=None, jax_enabled=True) == auto
    assert resolve("AUTO", jax_dir=None, jax_enabled=True) == auto
    assert resolve("auto", jax_dir="/users/own", jax_enabled=True) == "/users/own"  # kept
    assert resolve("auto", jax_dir=None, jax_enabled=False) is None     # turned off: kept off
    assert resolve("auto", jax_dir="/users/own", jax_enabled=False) is None
    for off in ("none", "None", None):
        assert resolve(off, jax_dir="/users/own", jax_enabled=True) is None
    assert resolve("/some/where", jax_dir="/users/own", jax_enabled=False) == "/some/where"
    assert resolve(tmp_path / "p", jax_dir=None, jax_enabled=True) == str(tmp_path / "p")
    assert resolve("~/xla", jax_dir=None, jax_enabled=True) == os.path.expanduser("~/xla")
    with pytest.raises(ValueError, match="compilation cache directory is empty"):
        resolve("  ", jax_dir=None, jax_enabled=True)
    monkeypatch.delenv("ARCTIC_JAX_CACHE")
    assert cc.cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "arctic-jax")


def test_a_directory_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "xla"
    with pytest.raises(ValueError, match=f"cannot create the compilation cache directory {bad}"):
        cc.configure_compilation_cache(bad)


def test_the_cli_flag_defaults_to_auto():
    from arctic_jax.cli import build_parser

    parser = build_parser()
    for argv in (["generate", "--prompt", "x"], ["serve"], ["embed", "--input", "a", "--output",
                                                            "b"], ["bench"]):
        assert parser.parse_args(argv).compilation_cache_dir == "auto"
    args = parser.parse_args(["serve", "--compilation-cache-dir", "none"])
    assert args.compilation_cache_dir == "none"


# ------------------------------------------------------------------ end to end
# One start: a tiny random Llama engine and a tiny random BERT Embedder, every program
# compiled at warm-up, then greedy generation and embeddings. Counted from the warm-ups on.
START = r"""
import json, sys
import jax, numpy as np
from arctic_jax.embedder import Embedder
from arctic_jax.engine.compilation_cache import CompilationCacheStats
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.config import ModelConfig
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingParams

setting, bert_dir = sys.argv[1], sys.argv[2]
embedder = Embedder(bert_dir, compilation_cache_dir=setting, max_num_batched_tokens=32,
                    token_buckets=(16, 32), max_num_seqs=4, seq_buckets=(4,))
start = embedder.compilation_cache
class Chars:
    eos_token_id = None
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(33 + int(i) % 90) for i in ids)
cfg = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=12, max_position_embeddings=128, eos_token_ids=())
weights = random_weights(cfg, jax.random.PRNGKey(3), scale=0.3)
engine = LLMEngine(LLAMA, cfg, weights, Chars(), EngineConfig(
    max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, page_size=4, num_pages=40,
    token_buckets=(8, 16), page_buckets=(16,)))
steps = CompilationCacheStats(start.directory)
embedder.engine.warmup()
engine.runner.warmup(progress=False)
tokens = {}
for prompt in ([5, 17, 3, 44, 9], [60, 2, 2, 81]):
    rid = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.0))
    tokens[rid] = []
while engine.has_unfinished():
    for out in engine.step():
        tokens[out.request_id] += out.new_token_ids
emb = embedder.embed(["hello world", "the cat sat on the mat", "a b c"])
steps.stop()
start.stop()
print(json.dumps({"directory": start.directory, "loaded": steps.loaded,
                  "compiled": steps.compiled, "summary": start.summary(),
                  "tokens": list(tokens.values()), "embeddings": emb.tolist()}))
"""


def tiny_bert(directory) -> str:
    """A random 2-layer BERT checkpoint with a 40-word WordPiece tokenizer (CLS pooling)."""
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    words = "hello world the cat sat on mat a b c".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words,
             *(f"w{i}" for i in range(40 - 5 - len(words)))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    return str(directory)


def start(setting: str, bert_dir: str, root) -> dict:
    env = dict(server_env(), ARCTIC_JAX_CACHE=str(root))
    done = subprocess.run([sys.executable, "-c", START, setting, bert_dir], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_files(directory) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(directory) for f in files}


def test_second_start_loads_every_program_from_the_cache(tmp_path):
    bert_dir = tiny_bert(tmp_path / "bert")
    root = tmp_path / "root"

    first = start("auto", bert_dir, root)
    directory = first["directory"]
    assert directory.startswith(str(root / "xla")) and os.path.isdir(directory), directory
    assert first["compiled"] > 0 and first["loaded"] == 0, first["summary"]
    written = cache_files(directory)
    assert len(written) >= first["compiled"]

    second = start("auto", bert_dir, root)
    assert second["directory"] == directory
    assert second["loaded"] >= first["compiled"] and second["compiled"] == 0, second["summary"]
    assert second["summary"].startswith(f"compilation cache {directory}: ")
    assert second["tokens"] == first["tokens"] and all(len(t) == 6 for t in first["tokens"])
    np.testing.assert_array_equal(second["embeddings"], first["embeddings"])

    off = start("none", bert_dir, root)
    assert off["directory"] is None and off["summary"].startswith("compilation cache off: ")
    assert off["loaded"] == 0 and off["compiled"] == first["compiled"], off["summary"]
    assert cache_files(directory) == written
    assert off["tokens"] == first["tokens"]
    np.testing.assert_array_equal(off["embeddings"], first["embeddings"])
