"""``arctic-jax bench --embeddings``: throughput of an embedding model (encoder).

In-process (default) it loads ``--model`` (an encoder checkpoint directory, default the
embedded all-MiniLM-L6-v2) or ``--random-weights bert-base|tiny`` (random weights, CLS pooling
and L2 normalisation as arctic-embed), compiles every batch shape, then measures

- the model forward: the engine's compiled program on the workload's full device batches,
  back to back on the device (compare with transformers' 2.1M tok/s on an H200);
- end to end: requests of ``--batch-size`` inputs through the async engine, ``--concurrency``
  in flight (texts tokenized in the request with ``--text``).

With ``--url`` it sends the requests to a running ``arctic-jax serve`` through the official
``openai`` client (base64 embeddings, its default), counting tokens from the usage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
from typing import Any

from arctic_jax.bench import embed_report as er
from arctic_jax.bench import workload as wl
from arctic_jax.bench.embed_workload import EmbedWorkload, PaddingStats, padding_stats
from arctic_jax.cli_args import (
    DEFAULT_EMBEDDING_MODEL,
    EMBEDDING_ENGINE_FLAGS,
    EMBEDDING_ONLY_FLAGS,
    add_embedding_only_args,
    embedding_engine_kwargs,
)

DEFAULT_INPUT_LEN = 512
DEFAULT_NUM_INPUTS = 4096
DEFAULT_BATCH_SIZE = 32
DEFAULT_CONCURRENCY = 32
ENCODER_SHAPES = ("bert-base", "tiny")
MODES = ("forward", "e2e")
HF_BERT_BASE_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072)

# Flags of the LLM benchmark that mean nothing here (an error when given with --embeddings).
LLM_ONLY_FLAGS = ("request_rate", "num_requests", "output_len", "output_len_range", "dataset",
                  "swiftkv", "data_parallel_size", "plot", "page_size", "num_pages",
                  "kv_cache_memory_fraction", "page_buckets", "contiguous_prefill_min_tokens",
                  "kv_cache_dtype", "speculative_config", "max_logprobs", "tensor_parallel_size",
                  "sequence_parallel_size", "enable_shift_parallel", "shift_parallel_threshold",
                  "parallel_mode")
# Flags of this benchmark only (an error without --embeddings).
EMBED_ONLY_FLAGS = ("num_inputs", "batch_size", "text", *EMBEDDING_ONLY_FLAGS, "embed_modes",
                    "client_processes")


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``--embeddings`` flags of ``bench`` (the model, engine, load and output flags are
    shared with the LLM benchmark)."""
    g = p.add_argument_group(
        "embeddings (--embeddings; also uses --model, --random-weights bert-base|tiny, --dtype, "
        "--quantization, "
        "--url, --concurrency, --input-len/--input-len-range, --seed, --vocab-size, "
        "--warmup-requests, --max-model-len, --max-num-batched-tokens, --token-buckets, "
        "--max-num-seqs, --attention-impl and the output flags)")
    g.add_argument("--embeddings", action="store_true",
                   help=f"benchmark an embedding model: --model is an encoder directory or "
                        f"{DEFAULT_EMBEDDING_MODEL!r} (the default here); inputs default to "
                        f"{DEFAULT_INPUT_LEN} tokens; --concurrency defaults to "
                        f"{DEFAULT_CONCURRENCY}")
    g.add_argument("--num-inputs", type=int, default=None, metavar="N",
                   help=f"inputs (sequences) in the workload (default {DEFAULT_NUM_INPUTS})")
    g.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"inputs per request, as a client sending a list (default "
                        f"{DEFAULT_BATCH_SIZE})")
    g.add_argument("--text", action="store_true",
                   help="send random English texts of the drawn token lengths (tokenized by the "
                        "model's tokenizer, so tokenization counts) instead of token ids")
    add_embedding_only_args(g)  # --seq-buckets
    g.add_argument("--embed-modes", default=None, metavar="MODES",
                   help="in-process measurements, comma-separated: forward (the compiled program "
                        "on full device batches), e2e (requests through the async engine); "
                        "default both")
    g.add_argument("--client-processes", type=int, default=None, metavar="N",
                   help="with --url: client processes sharing the requests and the concurrency "
                        "(default 1)")
    p.set_defaults(bench_parser=p)


# ------------------------------------------------------------------- flags
def _given(args: argparse.Namespace, dest: str) -> bool:
    return getattr(args, dest, None) != args.bench_parser.get_default(dest)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_llm_args(args: argparse.Namespace) -> None:
    """For ``bench`` without ``--embeddings``: no embedding-only flag, no encoder shape."""
    for dest in EMBED_ONLY_FLAGS:
        if _given(args, dest):
            raise ValueError(f"{_flag(dest)} belongs to the embedding benchmark: add --embeddings")
    if args.random_weights == "bert-base":
        raise ValueError(f"--random-weights {args.random_weights} is an encoder shape: add "
                         f"--embeddings")


def _modes(args: argparse.Namespace) -> tuple[str, ...]:
    if args.embed_modes is None:
        return MODES
    modes = tuple(m.strip() for m in args.embed_modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--embed-modes takes a comma list of {', '.join(MODES)}, got "
                         f"{args.embed_modes!r}")
    return modes


def _positive(args: argparse.Namespace, dest: str, default: int) -> int:
    value = getattr(args, dest)
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"{_flag(dest)} must be >= 1, got {value}")
    return value


def _length_range(args: argparse.Namespace) -> wl.LengthRange:
    if args.input_len is not None and args.input_len_range is not None:
        raise ValueError("give --input-len or --input-len-range, not both")
    if args.input_len_range is not None:
        return wl.parse_range(args.input_len_range, "--input-len-range")
    value = DEFAULT_INPUT_LEN if args.input_len is None else args.input_len
    if value < 1:
        raise ValueError(f"--input-len must be >= 1, got {value}")
    return wl.LengthRange(value, value)


def check_args(args: argparse.Namespace) -> None:
    """Fail on flags that do not fit the embedding benchmark, before loading anything."""
    for dest in LLM_ONLY_FLAGS:
        if _given(args, dest):
            raise ValueError(f"{_flag(dest)} is a flag of the LLM benchmark; the embedding "
                             f"benchmark does not take it")
    if args.random_weights is not None and args.random_weights not in ENCODER_SHAPES:
        raise ValueError(f"--random-weights {args.random_weights} is not an encoder shape; with "
                         f"--embeddings choose from {', '.join(ENCODER_SHAPES)}")
    if args.url:
        if args.random_weights:
            raise ValueError("--random-weights runs in-process; it cannot be combined with --url")
        if args.embed_modes is not None:
            raise ValueError("--embed-modes chooses in-process measurements; --url measures the "
                             "server end to end")
        if any(_given(args, d) for d in EMBEDDING_ENGINE_FLAGS if d != "max_model_len"):
            raise ValueError("engine flags configure the in-process engine; set them on "
                             "`arctic-jax serve` instead")
    else:
        if args.client_processes is not None:
            raise ValueError("--client-processes needs --url (HTTP clients)")
        _modes(args)
    if args.text and args.random_weights:
        raise ValueError("--text needs a model with a tokenizer (--model); random-weight models "
                         "take token ids")
    if args.warmup_requests < 0:
        raise ValueError("--warmup-requests must be >= 0")
    for dest, default in (("num_inputs", DEFAULT_NUM_INPUTS), ("batch_size", DEFAULT_BATCH_SIZE),
                          ("client_processes", 1)):
        _positive(args, dest, default)
    for level in args.concurrency or ():
        if level < 1:
            raise ValueError(f"--concurrency must be >= 1, got {level}")
    _length_range(args)


def command_line(args: argparse.Namespace) -> str:
    """``arctic-jax bench`` with the flags that differ from their defaults."""
    parts = ["arctic-jax", "bench", "--embeddings"]
    for action in args.bench_parser._actions:
        dest = action.dest
        if (not action.option_strings or dest in ("help", "bench_parser", "embeddings")
                or not _given(args, dest)):
            continue
        value = getattr(args, dest)
        flag = max(action.option_strings, key=len)
        if value is True and action.nargs == 0:
            parts.append(flag)
        else:
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


# ----------------------------------------------------------------- command
def cmd_embeddings(args: argparse.Namespace) -> int:
    """Run the embedding benchmark the flags describe; 1 if a request failed or a token count
    disagreed with the workload, else 0."""
    check_args(args)
    lengths = _length_range(args)
    levels = list(args.concurrency or [DEFAULT_CONCURRENCY])
    num_inputs = _positive(args, "num_inputs", DEFAULT_NUM_INPUTS)
    batch_size = _positive(args, "batch_size", DEFAULT_BATCH_SIZE)
    meta: dict[str, Any] = {"python_version": platform.python_version(),
                            "command": command_line(args)}
    if args.url:
        rows, workload, padding = _http(args, lengths, levels, num_inputs, batch_size, meta)
    else:
        rows, workload, padding = _in_process(args, lengths, levels, num_inputs, batch_size, meta)
    meta.update(workload_text=workload.description,
                input_len=lengths.lo if lengths.lo == lengths.hi else None)
    if padding is not None:
        meta["padding_text"] = er.padding_line(padding)
    print(er.format_table(rows))
    if padding is not None:
        print("padding: " + er.padding_line(padding) + " (the whole workload, batched in input "
              "order)")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows,
                       "padding": None if padding is None else dataclasses.asdict(padding)},
                      f, indent=1)
    if args.append_results:
        from arctic_jax.bench.report import append_results

        title = args.title or (f"Embeddings: {meta.get('model')} on {meta.get('card', '?')}, "
                               f"{workload.description}")
        append_results(args.append_results,
                       er.results_section(rows, meta, title=title, compare_note=args.compare_note))
        print(f"appended to {args.append_results}", file=sys.stderr)
    bad = any(r["failed"] or r.get("token_mismatches") for r in rows)
    return 1 if bad else 0


def _make_workload(lengths: wl.LengthRange, num_inputs: int, batch_size: int, seed: int, *,
                   vocab_size: int | None, tokenizer: Any, max_len: int | None) -> EmbedWorkload:
    """Token-id inputs (``vocab_size``) or texts (``tokenizer``) of the drawn lengths."""
    import numpy as np

    from arctic_jax.bench.embed_workload import text_maker, token_id_inputs

    if max_len is not None and lengths.hi > max_len:
        flag = "--input-len" if lengths.lo == lengths.hi else "--input-len-range"
        raise ValueError(f"{flag} {lengths} is above the model's max length {max_len} tokens "
                         f"(max_model_len)")
    kind = "texts" if tokenizer is not None else "token ids"
    text = (f"{num_inputs} inputs of {lengths} tokens ({kind}"
            f"{', uniform' if lengths.lo != lengths.hi else ''}), {batch_size} per request, "
            f"seed {seed}")
    if tokenizer is None:
        inputs = token_id_inputs(num_inputs, lengths, vocab_size, seed)
        return EmbedWorkload(tuple(inputs), tuple(len(s) for s in inputs), batch_size, lengths,
                             text)
    maker = text_maker(tokenizer)
    if lengths.lo < maker.min_length:
        raise ValueError(f"text inputs need at least {maker.min_length} tokens (the tokenizer "
                         f"adds {maker.overhead}); raise the input length")
    drawn = [int(n) for n in lengths.draw(np.random.default_rng(seed), num_inputs)]
    texts = maker.make(drawn, seed)
    return EmbedWorkload(tuple(texts), tuple(drawn), batch_size, lengths, text)


def _padding(engine: Any, lengths: list[int]) -> PaddingStats:
    return padding_stats(lengths, engine.plan(lengths))


def _in_process(args: argparse.Namespace, lengths: wl.LengthRange, levels: list[int],
                num_inputs: int, batch_size: int, meta: dict) -> tuple[list, EmbedWorkload, Any]:
    from arctic_jax.bench import embed_drivers as ed
    from arctic_jax.bench.runner import device_info
    from arctic_jax.cli_args import parse_dtype
    from arctic_jax.embedder import engine_config

    engine_kwargs = embedding_engine_kwargs(args)
    dtype = parse_dtype(args.dtype)
    tokenizer = None
    if args.random_weights:
        engine, name = ed.build_random_encoder(args.random_weights, engine_config(**engine_kwargs),
                                               dtype=dtype, seed=args.seed)
    else:
        model = DEFAULT_EMBEDDING_MODEL if args.model == "default" else args.model
        engine, tokenizer, name = ed.build_checkpoint_encoder(model, engine_kwargs, dtype=dtype)
    try:
        vocab = engine.vocab_size
        if args.vocab_size is not None:
            if not 1 <= args.vocab_size <= vocab:
                raise ValueError(f"--vocab-size must be in [1, {vocab}] for this model")
            vocab = args.vocab_size
        workload = _make_workload(lengths, num_inputs, batch_size, args.seed, vocab_size=vocab,
                                  tokenizer=tokenizer if args.text else None,
                                  max_len=engine.limits.max_model_len)
        lim = engine.limits
        quantized = engine.config.quantization
        meta.update(model=name, dtype=str(engine.dtype) + (f", {quantized} matmuls" if quantized else ""),
                    driver="in-process",
                    pooling=engine.pooling.mode + (" + L2 norm" if engine.pooling.normalize else ""),
                    bert_base_shape=er.is_bert_base_shape(engine.cfg), **device_info(),
                    engine_text=(f"max_model_len {lim.max_model_len}, token budget "
                                 f"{lim.max_num_batched_tokens}, token buckets "
                                 f"{list(lim.token_buckets)}, max_num_seqs {lim.max_num_seqs}, "
                                 f"sequence buckets {list(lim.seq_buckets)}, "
                                 f"{lim.attention_impl} attention"))
        timed = ed.full_batches(engine, workload.lengths)
        if "forward" in _modes(args) and not timed:
            raise ValueError(f"the workload ({workload.num_inputs} inputs, {workload.num_tokens} "
                             f"tokens) fills no device batch of {lim.max_num_batched_tokens} "
                             f"tokens; give more --num-inputs for the model-forward measurement "
                             f"(or --embed-modes e2e)")
        print(f"warming up: compiling {len(engine.shapes)} embedding programs ...", file=sys.stderr)
        meta["warmup_s"] = engine.warmup()
        mixed = lengths.lo != lengths.hi
        rows = []
        if "forward" in _modes(args):
            ids = (tokenizer.encode(list(workload.inputs)) if workload.is_text
                   else list(workload.inputs))
            result = ed.run_forward(engine, engine.prepare(ids))
            padding = None
            if mixed:
                sub = [n for s, b in timed for n in workload.lengths[s:s + b.num_seqs]]
                padding = padding_stats(sub, [b for _, b in timed])
            rows.append(er.forward_row(result, workload, padding))
        workload_padding = _padding(engine, list(workload.lengths)) if mixed else None
        if "e2e" in _modes(args):
            for level in levels:
                run = ed.run_in_process(engine, workload, concurrency=level, tokenizer=tokenizer,
                                        warmup_requests=args.warmup_requests)
                rows.append(er.run_row(er.MODE_IN_PROCESS, run, workload, concurrency=level,
                                       padding=workload_padding))
        return rows, workload, workload_padding
    finally:
        engine.close()
        if tokenizer is not None:
            tokenizer.close()


def _http(args: argparse.Namespace, lengths: wl.LengthRange, levels: list[int], num_inputs: int,
          batch_size: int, meta: dict) -> tuple[list, EmbedWorkload, None]:
    """Over HTTP: the workload is made with ``--model``'s tokenizer (texts) or vocabulary
    (token ids, unless ``--vocab-size``); its max length is checked against
    ``--max-model-len`` or the checkpoint's ``max_position_embeddings``."""
    import os

    from arctic_jax.bench import embed_drivers as ed

    model = DEFAULT_EMBEDDING_MODEL if args.model == "default" else args.model
    from checkpoints.sentence_transformers import read_pooling_config

    path, hf_config = _checkpoint_config(model)
    pooling = read_pooling_config(path)
    # As the server's default: max_position_embeddings, or max_seq_length if smaller.
    max_len = args.max_model_len or min(
        n for n in (hf_config.get("max_position_embeddings"), pooling.max_seq_length, 1 << 30) if n)
    tokenizer = None
    if args.text:
        from arctic_jax.engine.embedding_tokenizer import EmbeddingTokenizer
        from checkpoints.loader import load_tokenizer

        tokenizer = EmbeddingTokenizer(load_tokenizer(path), pooling)
    vocab = args.vocab_size or hf_config.get("vocab_size")
    if not args.text and not vocab:
        raise ValueError(f"token-id inputs need --vocab-size (no vocab_size in {path})")
    workload = _make_workload(lengths, num_inputs, batch_size, args.seed, vocab_size=vocab,
                              tokenizer=tokenizer, max_len=max_len)
    meta.update(model=f"{os.path.basename(path.rstrip(os.sep))} (workload made with it)",
                driver=f"HTTP {args.url}, openai client (base64)",
                card=f"server at {args.url} (not reported over HTTP)",
                jax_version="of the server", dtype="as served", pooling="as served",
                engine_text="as served", bert_base_shape=all(
                    hf_config.get(k) == v for k, v in HF_BERT_BASE_SHAPE.items()))
    rows = []
    processes = _positive(args, "client_processes", 1)
    for level in levels:
        run = ed.run_http(args.url, workload, concurrency=level,
                          warmup_requests=args.warmup_requests, client_processes=processes)
        meta["model"] = f"{run.info['served_model']} (served)"
        rows.append(er.run_row(er.MODE_HTTP, run, workload, concurrency=level, padding=None))
    return rows, workload, None


def _checkpoint_config(model: str) -> tuple[str, dict]:
    """(directory, config.json) of an encoder checkpoint or the embedded default."""
    import os

    if model == DEFAULT_EMBEDDING_MODEL:
        from checkpoints.loader import default_embedding_model_path

        path = default_embedding_model_path()
    else:
        path = model
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"--model {model}: no config.json in {path} (the workload needs the "
                         f"encoder's tokenizer or vocabulary)")
    with open(config, encoding="utf-8") as f:
        return path, json.load(f)
