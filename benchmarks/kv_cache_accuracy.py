"""KV-cache precision on a real model: teacher-forced next-token predictions per cache dtype.

Feeds English passages through the model step in prefill chunks (each chunk's
attention reads the earlier chunks' K/V back from the cache, as serving does)
with a float32, a bfloat16 and an fp8 (float8_e4m3fn) KV cache, and compares
every position's next-token distribution with the float32-cache run: top-1
agreement, mean and max KL divergence, and the text's perplexity. Weights and
activations are the same in all runs; only the cache dtype differs. Accuracy,
not speed, so a CPU run counts.

    python benchmarks/kv_cache_accuracy.py                       # embedded SmolLM2-135M
    python benchmarks/kv_cache_accuracy.py --model /path/to/llama --append-results
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.llama import make_step_fn
from checkpoints.loader import load_tokenizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn}

# Passages written for this benchmark (plain prose on varied topics).
PASSAGES = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens until it shone, and wrote the weather in a leather logbook: wind "
    "from the north-east, a falling barometer, three fishing boats returning late. In winter the "
    "storms came without warning, and the beam was all that stood between the ships and the "
    "rocks below the cliff. Years later, when the light was automated, he still walked up to the "
    "gallery at sunset, out of habit, to watch the first flash sweep across the water.",
    "To make bread, mix flour, water, salt and a little yeast into a rough dough, then leave it "
    "covered for half an hour so the flour can absorb the water. Knead it for ten minutes until "
    "it is smooth and elastic, shape it into a ball, and let it rise in a warm place until it has "
    "doubled in size. Press out the air, fold it into a loaf, and let it rise again. Bake it in a "
    "hot oven for about forty minutes; the crust should be deep brown and the loaf should sound "
    "hollow when you tap the bottom.",
    "A hash table stores values in an array of buckets and uses a hash function to turn each key "
    "into a bucket index. When two keys land in the same bucket, the table must resolve the "
    "collision, either by chaining entries in a list or by probing for another free slot. As the "
    "table fills up, collisions become more frequent, so most implementations grow the array "
    "and rehash every key once the load factor passes a threshold. With a good hash function, "
    "lookups, insertions and deletions take constant time on average.",
    "The river begins as snowmelt high in the mountains, a thin stream that trickles between "
    "boulders and moss. Lower down it gathers tributaries, widens into a valley, and turns the "
    "wheels of old mills that once ground grain for the villages along its banks. By the time it "
    "reaches the plain it is slow and brown, carrying silt that settles into fertile fields, and "
    "at the coast it spreads into a delta of marshes where herons wait motionless in the reeds.",
)


def teacher_forced_logits(step, weights, cfg, tokens, cache_dtype, chunk: int, page_size: int):
    """Log-probabilities [len(tokens) - 1, V] of each next token, prefilled in ``chunk``-token
    steps over a cache of ``cache_dtype``."""
    n = len(tokens)
    pages = list(range(-(-n // page_size)))
    cache = KVCache.allocate(cfg, len(pages), page_size, cache_dtype)
    buckets = Buckets(tokens=(chunk,), seqs=(1,), pages=(len(pages),))
    out = []
    for start in range(0, n - 1, chunk):
        piece = tokens[start:min(start + chunk, n - 1)]
        c = SequenceChunk(tokens=list(piece), start=start, pages=pages,
                          logits_at=list(range(len(piece))))
        batch, num = build_step_batch([c], page_size, buckets)
        logits, cache = step(weights, cache, batch)
        out.append(np.asarray(jax.nn.log_softmax(logits[:num].astype(jnp.float32), axis=-1)))
    return np.concatenate(out)


def compare(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    """Agreement and divergence of log-probabilities ``got`` against ``ref`` ([n, V] each)."""
    kl = np.sum(np.exp(ref) * (ref - got), axis=-1)
    rows = np.arange(len(targets))
    return dict(top1=float(np.mean(ref.argmax(-1) == got.argmax(-1))), kl_mean=float(kl.mean()),
                kl_max=float(kl.max()), ppl=float(np.exp(-got[rows, targets].mean())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default", help="checkpoint (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="float32", help="weight and activation dtype")
    p.add_argument("--chunk", type=int, default=32, help="prefill tokens per step")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--append-results", action="store_true")
    args = p.parse_args(argv)

    import checkpoints
    loaded = checkpoints.load_model(args.model, dtype=jnp.dtype(args.dtype), progress=False)
    cfg, weights = loaded.config, loaded.weights
    tok = load_tokenizer(loaded.tokenizer_source.path, loaded.tokenizer_source.gguf_file)
    step = make_step_fn(cfg)
    texts = [np.asarray(tok.encode(t), np.int32) for t in PASSAGES]

    per_dtype = {name: [] for name in CACHE_DTYPES}
    for tokens in texts:
        for name, dtype in CACHE_DTYPES.items():
            per_dtype[name].append(teacher_forced_logits(step, weights, cfg, tokens, dtype,
                                                         args.chunk, args.page_size))
    ref = np.concatenate(per_dtype["float32"])
    targets = np.concatenate([t[1:] for t in texts])
    rows = [(name, compare(ref, np.concatenate(lps), targets)) for name, lps in per_dtype.items()]

    dev = jax.devices()[0]
    head = [f"- date {datetime.date.today()}, device {getattr(dev, 'device_kind', dev.platform)} "
            f"({jax.default_backend()}), jax {jax.__version__}, python {platform.python_version()}",
            f"- model {loaded.name}, weights/activations {args.dtype}; {len(texts)} passages, "
            f"{len(targets)} predicted tokens, prefill chunks of {args.chunk}, page size "
            f"{args.page_size}; reference: the float32-cache run"]
    table = ["| KV cache | top-1 agreement | mean KL (nats) | max KL | perplexity |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows:
        table.append(f"| {name} | {100 * r['top1']:.2f}% | {r['kl_mean']:.2e} | "
                     f"{r['kl_max']:.2e} | {r['ppl']:.3f} |")
    print("\n".join(head + [""] + table))
    if args.append_results:
        cmd = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
        with open(RESULTS, "a") as f:
            f.write(f"\n## KV-cache precision: `python benchmarks/kv_cache_accuracy.py {cmd}`\n\n"
                    + "\n".join(head + [""] + table) + "\n")
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
