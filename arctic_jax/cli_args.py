"""Argument helpers shared by the ``arctic-jax`` subcommands (generate, embed, serve, bench).

Nothing here imports jax, FastAPI or a model at import time, so building the parser stays cheap
and works where the serving extras are not installed.
"""
from __future__ import annotations

import argparse
from typing import Any

from arctic_jax.config import QUANTIZATIONS
from arctic_jax.speculative.config import SpeculativeConfig


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_model_args(p: argparse.ArgumentParser, *, embeddings: bool = False) -> None:
    """The model and engine flags every subcommand that loads a model takes. ``embeddings``:
    the subcommand also serves embedding models (``serve``); the help tells what the flags
    they share mean for them (``add_embedding_only_args`` adds the rest)."""
    def shared(text: str, embedding_text: str) -> str:
        return f"{text}; embedding models: {embedding_text}" if embeddings else text

    model_help = "HF checkpoint dir, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)"
    if embeddings:
        model_help = (f"HF checkpoint dir, .gguf file, 'default' (embedded SmolLM2-135M-Instruct) "
                      f"or '{DEFAULT_EMBEDDING_MODEL}' (embedded sentence encoder); an embedding "
                      f"model (a BERT encoder) serves /v1/embeddings and takes only --dtype, "
                      f"--quantization, --max-model-len, --max-num-seqs, --max-num-batched-tokens, "
                      f"--token-buckets, --seq-buckets and --attention-impl of the engine flags")
    p.add_argument("--model", default="default", help=model_help)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help=shared("most tokens of one request, prompt plus output (default: the "
                               "model's context length)",
                               "longest input (default: max_position_embeddings, or the "
                               "sentence-transformers max_seq_length if smaller)"))
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=shared("most requests running at once (more wait in the queue)",
                               "most inputs in one device batch (default 1024 on GPU, 128 on "
                               "CPU)"))
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=shared("token budget of one engine step (prefill chunks plus decodes)",
                               "token budget of one device batch (default 16384 on GPU, 2048 "
                               "on CPU)"))
    p.add_argument("--page-size", type=int, default=None, help="tokens per KV-cache page (default 16)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV-cache pages (default: from --kv-cache-memory-fraction)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                   help="fraction of free device memory given to the KV cache (default 0.5)")
    p.add_argument("--attention-impl", default=None,
                   help=shared("blocked (CPU default), reference, pallas (GPU default) or "
                               "pallas-triton (Triton prefill kernel)",
                               "reference (CPU default) or pallas (GPU default)"))
    p.add_argument("--token-buckets", type=int_list, default=None,
                   help=shared("comma-separated step token counts to compile (default: powers "
                               "of 2)", "batch token counts; the largest is the token budget"))
    p.add_argument("--page-buckets", type=int_list, default=None,
                   help="comma-separated page-table widths to compile (default: powers of 2)")
    p.add_argument("--contiguous-prefill-min-tokens", type=int, default=None,
                   help="steps that are one prompt's first chunk of at least this many (padded) "
                        "tokens run cuDNN causal attention on their own K/V; 0: never "
                        "(default: 1024 on a GPU with Pallas attention, else 0)")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="KV cache element type: auto (the model's dtype, default) or fp8 "
                        "(float8_e4m3fn, saturating: half the cache bytes of a 16-bit model)")
    p.add_argument("--speculative-config", type=speculative_config, default=None,
                   help="speculative decoding as JSON, vLLM's spelling: "
                        "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                        "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 1}' or '{\"method\": "
                        "\"suffix\", \"num_speculative_tokens\": 16, \"suffix_cache_max_depth\": 24, "
                        "\"suffix_cache_max_requests\": 10000, \"suffix_max_spec_factor\": 1.0, "
                        "\"suffix_max_spec_offset\": 0.0, \"suffix_min_token_prob\": 0.1, "
                        "\"suffix_use_tree_spec\": false}' (true: verify a draft tree per step); "
                        "any method also takes "
                        "disable_by_batch_size (above N running requests only N draft) and "
                        "hard_disable_by_batch_size (above N none does), and "
                        "adaptive_disable_batch_size (default 32, 0: off: above N running "
                        "requests speculation stays on only while it measurably pays); greedy "
                        "and sampled "
                        "requests speculate (lossless rejection sampling) "
                        "(default: off)")
    p.add_argument("--max-logprobs", type=int, default=None,
                   help="most top logprobs a request may ask for (default 5, at most 20)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="Megatron tensor parallelism over this many devices")
    p.add_argument("--sequence-parallel-size", "-sp", type=int, default=1,
                   help="Ulysses sequence parallelism; SP x TP devices in all")
    p.add_argument("--enable-shift-parallel", action="store_true",
                   help="TP for small steps, SP for large ones, over one KV cache")
    p.add_argument("--shift-parallel-threshold", default="512",
                   help="tokens per step at or below which TP is used, or 'auto' to calibrate")
    p.add_argument("--parallel-mode", choices=["tp", "sp", "shift"], default=None,
                   help="shortcut for the parallel flags above")
    add_compilation_cache_arg(p)
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def add_compilation_cache_arg(p: argparse.ArgumentParser) -> None:
    """``--compilation-cache-dir`` (see ``arctic_jax.engine.compilation_cache``)."""
    p.add_argument("--compilation-cache-dir", default="auto", metavar="DIR|auto|none",
                   help="persistent XLA compilation cache: compiled programs are saved there and "
                        "loaded, not compiled, on the next start. auto (default): "
                        "$ARCTIC_JAX_CACHE/xla/<jax version, backend, device> (~/.cache/"
                        "arctic-jax/xla/...), or the directory jax is already configured with "
                        "(JAX_COMPILATION_CACHE_DIR); none: off; else that directory")


ENGINE_FLAGS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "page_size", "num_pages",
                "kv_cache_memory_fraction", "attention_impl", "tensor_parallel_size",
                "sequence_parallel_size", "shift_parallel_threshold", "parallel_mode",
                "token_buckets", "page_buckets", "max_logprobs", "contiguous_prefill_min_tokens",
                "kv_cache_dtype", "speculative_config")


def speculative_config(text: str) -> SpeculativeConfig:
    """argparse type: ``--speculative-config`` JSON, validated when the flags are parsed."""
    try:
        return SpeculativeConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the shared model/engine flags (those given)."""
    kwargs = {n: getattr(args, n) for n in ENGINE_FLAGS if getattr(args, n, None) is not None}
    if getattr(args, "enable_shift_parallel", False):
        kwargs["enable_shift_parallel"] = True
    return kwargs


def parse_dtype(name: str | None) -> Any:
    """The jnp dtype for ``--dtype`` (None: the engine's default)."""
    if name is None:
        return None
    import jax.numpy as jnp
    return jnp.dtype(name)


# ------------------------------------------------------------- embedding models
# checkpoints.loader.DEFAULT_EMBEDDING_MODEL (not imported: building the parser loads no jax)
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MAX_EMBEDDING_INPUTS = 2048   # inputs in one /v1/embeddings request (OpenAI's limit)
# serve: the request-size limit (why: arctic_jax.serving.request_limits) and graceful shutdown
DEFAULT_MAX_REQUEST_BYTES = 8 << 20
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0

# Flag names (argparse dests) passed to the embedding engine when given.
EMBEDDING_ENGINE_FLAGS = ("max_model_len", "max_num_batched_tokens", "token_buckets",
                          "max_num_seqs", "seq_buckets", "attention_impl", "quantization")


def add_embedding_engine_args(p: argparse.ArgumentParser) -> None:
    """The embedding model and engine flags (``arctic-jax embed``)."""
    p.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL,
                   help=f"HF encoder checkpoint directory (with its sentence-transformers files), "
                        f"or {DEFAULT_EMBEDDING_MODEL!r} (embedded; the default)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest input in tokens (default: the model's max_position_embeddings, "
                        "or its sentence-transformers max_seq_length if smaller)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one device batch (default: 16384 on GPU, 2048 on CPU)")
    p.add_argument("--token-buckets", type=int_list, default=None,
                   help="comma-separated batch token counts to compile; the largest is the budget "
                        "(default: powers of 2)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="most inputs in one device batch (default: 1024 on GPU, 128 on CPU)")
    add_embedding_only_args(p)
    p.add_argument("--attention-impl", default=None, choices=["reference", "pallas"],
                   help="segment attention: reference (dense mask; CPU default) or pallas "
                        "(GPU default)")
    add_compilation_cache_arg(p)
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


# The flags (argparse dests) add_embedding_only_args adds: an error where no embedding model runs.
EMBEDDING_ONLY_FLAGS = ("seq_buckets", "quantization")


def add_embedding_only_args(p: argparse.ArgumentParser) -> None:
    """The embedding engine flags that ``add_model_args`` lacks (``serve`` takes both):
    ``EMBEDDING_ONLY_FLAGS``."""
    p.add_argument("--seq-buckets", type=int_list, default=None,
                   help="comma-separated batch sequence counts to compile (embedding models); "
                        "the largest is --max-num-seqs (default: powers of 8)")
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="embedding models: fp8 runs each layer's matmuls on FP8 (E4M3) weights "
                        "and activations, per-channel and per-token scales; close to the "
                        "bfloat16 vectors but not faster yet (BERT-base: 0.85x on an H100) "
                        "(default: none, the --dtype weights)")


def embedding_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Embedder(...) keyword arguments from the engine flags given."""
    return {n: getattr(args, n) for n in EMBEDDING_ENGINE_FLAGS if getattr(args, n, None) is not None}


def llm_only_flags_given(args: argparse.Namespace) -> list[str]:
    """The ``add_model_args`` flags that only a generative model uses, set away from their
    defaults in ``args`` (as ``--flag`` spellings); an embedding server rejects them."""
    defaults = argparse.ArgumentParser(add_help=False)
    add_model_args(defaults)
    shared = set(EMBEDDING_ENGINE_FLAGS) | {"model", "dtype", "compilation_cache_dir", "log_level"}
    return ["--" + dest.replace("_", "-") for dest, default in vars(defaults.parse_args([])).items()
            if dest not in shared and getattr(args, dest, default) != default]

