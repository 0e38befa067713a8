"""The draft model's own cost against the base model's decode step (issue 13).

Random weights of a named base shape (default Llama-3.1-8B) and of Arctic draft models for it
(MLP untied and sum-LSTM tied, ``--n-predict`` 3, ``--inner-dim`` 4096 as Arctic's 8B
speculators). For each batch size B (``--batch-sizes``, default 1 and 64):

- decode step: one base-model step of B sequences with ``--context`` cached tokens each
  (``llama.forward`` through ``make_step_fn``, the engine's default attention), back to back;
- draft program: the engine's draft program (``programs.jit_draft_program``) for B entries after
  a verify step (hidden rows and packed result as the engine passes them), greedy and sampled
  (the sampled one also writes q for every draft), back to back.

Reports milliseconds and the draft program as a percentage of the decode step (goal: under 5%).
On a CPU ``--model tiny --inner-dim 64`` checks that it runs; the times count only on a GPU.

    python benchmarks/draft_model_cost.py --append-results        # GPU
    python benchmarks/draft_model_cost.py --model tiny --inner-dim 64 --iters 3
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def time_back_to_back(run, iters: int) -> float:
    """Seconds per call of ``run()`` (returns an array to wait on), launched back to back."""
    for _ in range(2):
        out = run()
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(iters):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def decode_cost(model: str, batch_sizes: list[int], context: int, iters: int, page_size: int = 16):
    """(config, dtype, {B: seconds per decode step})."""
    from arctic_jax.attention.dispatch import default_attention_impl
    from arctic_jax.attention.strategy import PagedAttention
    from arctic_jax.bench.runner import RANDOM_MODEL_SHAPES
    from arctic_jax.models.llama import StepOptions, make_step_fn
    from arctic_jax.models.registry import spec_by_name
    from benchmarks.decode_prefill import decode_batch, random_cache, time_steps
    from checkpoints.loader import default_dtype

    cfg = RANDOM_MODEL_SHAPES[model]()
    dtype = jnp.dtype(default_dtype())
    context = min(context, cfg.max_position_embeddings - 1)
    weights = spec_by_name("llama").random_weights(cfg, jax.random.PRNGKey(0), dtype=dtype)
    step = make_step_fn(cfg, StepOptions(attention=PagedAttention(default_attention_impl())))
    rng = np.random.default_rng(0)
    seconds = {}
    for b in batch_sizes:
        batch, pages = decode_batch(b, context, page_size, rng)
        cache = random_cache(cfg, pages, page_size, dtype, jax.random.PRNGKey(1))
        _, seconds[b], cache = time_steps(step, weights, cache, batch, iters)
        print(f"# decode {model} B={b}: {1e3 * seconds[b]:.3f} ms", flush=True)
        del cache
    del weights
    gc.collect()
    return cfg, dtype, seconds


def draft_cost(base, dtype, kind: str, n_predict: int, inner: int, batch_sizes: list[int],
               iters: int, max_rows: int = 4) -> dict[tuple[int, str], float]:
    """{(B, mode): seconds per draft program} for one draft model kind."""
    from arctic_jax.engine.packing import pack
    from arctic_jax.engine.programs import jit_draft_program
    from arctic_jax.engine.step_inputs import DraftInputs
    from arctic_jax.sampling import SamplingMode, SamplingParams, SamplingTensors
    from arctic_jax.speculative import draft_model as dm

    cfg = dm.DraftModelConfig(kind, n_predict, base.vocab_size, base.hidden_size, inner,
                              tie_weights=kind == "lstm", scale_input=True)
    weights = dm.random_weights(cfg, jax.random.PRNGKey(2), dtype=dtype)
    rng = np.random.default_rng(1)
    out = {}
    for b in batch_sizes:
        R = b * max_rows                          # a verify step: every entry checks 3 drafts
        hidden = jnp.asarray(rng.standard_normal((R, base.hidden_size)), dtype)
        result = np.zeros((R, 3), np.int32)
        result[:, 0] = rng.integers(0, base.vocab_size, R)
        result[:, 2] = rng.integers(0, 2, R)
        result = jnp.asarray(result)
        for mode, params in ((SamplingMode.GREEDY, SamplingParams(temperature=0)),
                             (SamplingMode.RANDOM, SamplingParams(temperature=0.8))):
            inputs = DraftInputs(first_row=np.arange(b, dtype=np.int32) * max_rows,   # one entry per
                                 num_rows=np.full(b, max_rows, np.int32),         # sequence
                                 q_slot=np.arange(b, dtype=np.int32) * n_predict,
                                 sampling=SamplingTensors.from_params([params] * b, [7] * b,
                                                                      list(range(b)), b))
            flat, layout = pack(inputs)
            flat = jnp.asarray(flat)
            program = jit_draft_program(cfg, n_predict, mode, max_rows, 2)
            state = {"q": jnp.zeros((b * n_predict, base.vocab_size), jnp.float32)}

            def run(program=program, flat=flat, layout=layout, state=state, weights=weights,
                    hidden=hidden, result=result):
                state["q"], packed = program(weights, hidden, result, state["q"], flat, layout)
                return packed

            out[b, mode.value] = time_back_to_back(run, iters)
            print(f"# draft {kind} B={b} {mode.value}: {1e3 * out[b, mode.value]:.3f} ms", flush=True)
    gc.collect()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="random-weight base shape")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per sequence")
    p.add_argument("--n-predict", type=int, default=3)
    p.add_argument("--inner-dim", type=int, default=4096)
    p.add_argument("--kinds", default="mlp,lstm")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--append-results", action="store_true")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    base, dtype, step_s = decode_cost(args.model, sizes, args.context, args.iters)
    rows = []
    for kind in args.kinds.split(","):
        cost = draft_cost(base, dtype, kind, args.n_predict, args.inner_dim, sizes, args.iters)
        for (b, mode), s in cost.items():
            rows.append((kind, b, mode, s, step_s[b]))
    device = jax.devices()[0].device_kind
    lines = [f"## Draft model cost (issue 13), {args.model} base, {device}", "",
             f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; jax {jax.__version__}, "
             f"Python {platform.python_version()}; card {device}; {dtype.name} weights",
             f"- Draft: n_predict {args.n_predict}, inner dim {args.inner_dim}, random weights; the "
             "engine's draft program after a verify step (4 rows per sequence)",
             f"- Compared against: one base decode step of B sequences, context {args.context} "
             "(same run); goal: draft under 5% of the step",
             f"- Command: `python benchmarks/{os.path.basename(__file__)} {' '.join(argv or sys.argv[1:])}`",
             "", "| draft | B | mode | draft ms | decode step ms | draft / step |",
             "|---|---|---|---|---|---|"]
    for kind, b, mode, s, t in rows:
        lines.append(f"| {kind} | {b} | {mode} | {1e3 * s:.3f} | {1e3 * t:.3f} | {100 * s / t:.1f}% |")
    table = "\n".join(lines)
    print(table)
    if args.append_results:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
