"""The ``arctic-jax train-speculator`` subcommand: self-distil a base model, train an Arctic MLP
or LSTM draft model on it, write the checkpoint in the Arctic layout and print per-head accuracy
and greedy acceptance on held-out prompts, for the trained weights and their initialisation."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from arctic_jax.cli_args import add_model_args, engine_kwargs, parse_dtype

log = logging.getLogger("arctic_jax.training")


def register(sub: Any) -> None:
    """Add ``train-speculator`` to the subparsers ``sub``."""
    p = sub.add_parser("train-speculator", help="train an Arctic MLP/LSTM draft model for a base model "
                                                "on its own generations (self-distillation)")
    add_model_args(p)
    d = p.add_argument_group("draft model")
    d.add_argument("--kind", choices=["mlp", "lstm"], default="mlp")
    d.add_argument("--n-predict", type=int, default=3, help="draft tokens per step (heads)")
    d.add_argument("--inner-dim", type=int, default=256, help="the draft model's state size")
    d.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="one embedding/head/norm for all steps (default: on; the LSTM needs it)")
    d.add_argument("--scale-input", action=argparse.BooleanOptionalAction, default=True,
                   help="RMS-normalise the base hidden state (divided by sqrt 2) before step 0")
    add_data_args(p.add_argument_group("data (self-distillation)"),
                  ".npz file of the generations and hidden states: read when it exists (same "
                  "settings), else written, so a second run skips generation")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, cosine decay)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=100, help="steps between loss lines on stderr")
    t.add_argument("--output", required=True, help="checkpoint directory to write (new or empty)")
    t.add_argument("--format", choices=["safetensors", "bin"], default="safetensors",
                   help="weights file: model.safetensors or a torch pytorch_model.bin")
    p.set_defaults(func=cmd_train_speculator)


def add_data_args(g: Any, data_cache_help: str) -> None:
    """The flags of the base model's own generations (train-speculator, distill-swiftkv)."""
    g.add_argument("--num-prompts", type=int, default=256)
    g.add_argument("--max-tokens", type=int, default=128, help="generated tokens per prompt (at most)")
    g.add_argument("--sampled-fraction", type=float, default=0.5,
                   help="share of prompts answered by sampling (the rest greedily)")
    g.add_argument("--temperature", type=float, default=0.8, help="for the sampled answers")
    g.add_argument("--held-out-fraction", type=float, default=0.1,
                   help="share of prompts held out for evaluation")
    g.add_argument("--data-cache", default=None, help=data_cache_help)


def generation_settings(args: argparse.Namespace) -> Any:
    """The ``data.GenerationSettings`` of ``add_data_args``' flags."""
    from arctic_jax.training import data

    return data.GenerationSettings(model=args.model, num_prompts=args.num_prompts,
                                   max_tokens=args.max_tokens, sampled_fraction=args.sampled_fraction,
                                   temperature=args.temperature, seed=args.seed)


def _check_args(args: argparse.Namespace) -> None:
    """Fail before the long part: a used output directory or a multi-device base model."""
    if (args.tensor_parallel_size > 1 or args.sequence_parallel_size > 1 or args.parallel_mode
            or args.enable_shift_parallel):
        raise ValueError("train-speculator runs the base model on one device: drop the "
                         "tensor/sequence/shift parallel flags")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--output {out} exists and is not an empty directory")


def _tokenizer(model: str) -> Any:
    """The tokenizer of ``--model`` alone (no weights), as the checkpoint loader finds it."""
    import checkpoints
    from checkpoints.loader import load_tokenizer

    path = checkpoints.default_model_path() if model in ("default", None) else os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model source {path} does not exist")
    if path.lower().endswith(".gguf") and os.path.isfile(path):
        return load_tokenizer(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    return load_tokenizer(path)


def _load_llm(args: argparse.Namespace, conversations: list) -> Any:
    """The base model, its ``max_model_len`` (unless given) the longest prompt plus its reply."""
    from arctic_jax.llm import LLM
    from arctic_jax.tokenizer import encode_chat

    kwargs = engine_kwargs(args)
    if "max_model_len" not in kwargs:
        tok = _tokenizer(args.model)
        longest = max(len(encode_chat(tok, c)) for c in conversations)
        kwargs["max_model_len"] = -(-(longest + args.max_tokens) // 64) * 64
    return LLM(args.model, dtype=parse_dtype(args.dtype),
               compilation_cache_dir=args.compilation_cache_dir, **kwargs)


def _data(args: argparse.Namespace) -> Any:
    from arctic_jax.training import data, prompts

    settings = generation_settings(args)
    if args.data_cache and os.path.exists(args.data_cache):
        print(f"data: reading {args.data_cache}", file=sys.stderr)
        return data.load_cached(args.data_cache, settings)
    conversations = prompts.conversations(args.num_prompts, args.seed)
    start = time.perf_counter()
    llm = _load_llm(args, conversations)
    distilled = data.distill(llm, conversations, settings)
    print(f"data: {distilled.num_sequences} generations, {distilled.tokens.shape[0]} tokens in "
          f"{time.perf_counter() - start:.0f} s; the recomputed hidden states reproduce "
          f"{distilled.greedy_agreement:.2%} of the greedy tokens", file=sys.stderr)
    if args.data_cache:
        distilled.save(args.data_cache)
        print(f"data: cached in {args.data_cache}", file=sys.stderr)
    return distilled


def _table(n: int, init: Any, trained: Any, greedy: Any) -> str:
    """The per-head accuracy table and acceptance lines (``greedy``: the trained model's result
    on the greedy held-out generations alone, or None)."""
    lines = [f"held-out: {trained.num_examples} positions",
             "head  predicts  init acc  trained acc  trained loss"]
    for i in range(n):
        lines.append(f"{i:>4}  t+{i + 2:<7} {init.head_accuracy[i]:>8.1%}  "
                     f"{trained.head_accuracy[i]:>11.1%}  {trained.head_loss[i]:>12.3f}")
    lines.append(f"greedy draft: mean accepted {init.mean_accepted:.3f} -> {trained.mean_accepted:.3f}, "
                 f"tokens per step {init.tokens_per_step:.3f} -> {trained.tokens_per_step:.3f} "
                 f"(init -> trained)")
    if greedy is not None:
        lines.append(f"on the {greedy.num_examples} positions of greedy generations: mean accepted "
                     f"{greedy.mean_accepted:.3f}, tokens per step {greedy.tokens_per_step:.3f} "
                     f"(trained)")
    return "\n".join(lines)


def cmd_train_speculator(args: argparse.Namespace) -> int:
    import jax

    from arctic_jax.speculative.draft_model import DraftModelConfig, random_weights
    from arctic_jax.training import data, trainer

    _check_args(args)
    tie = args.tie_weights if args.tie_weights is not None else True
    distilled = _data(args)
    cfg = DraftModelConfig(kind=args.kind, n_predict=args.n_predict,
                           vocab_size=distilled.vocab_size, input_hidden_dim=distilled.hidden_size,
                           inner_dim=args.inner_dim, tie_weights=tie, scale_input=args.scale_input)
    tc = trainer.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_seqs, held_seqs = data.split_by_prompt(distilled.num_sequences, args.held_out_fraction,
                                                 args.seed)
    train_set = data.windows(distilled, train_seqs, cfg.n_predict)
    held_set = data.windows(distilled, held_seqs, cfg.n_predict)
    print(f"training a {cfg.kind} draft model (n_predict {cfg.n_predict}, inner dim {cfg.inner_dim}) "
          f"on {len(train_set)} positions of {train_seqs.shape[0]} prompts; held out: "
          f"{len(held_set)} positions of {held_seqs.shape[0]} prompts", file=sys.stderr)
    init = random_weights(cfg, jax.random.key(args.seed))
    init_eval = trainer.evaluate(cfg, init, distilled.hidden, held_set)
    start = time.perf_counter()

    def on_step(step: int, loss: float, heads: Any) -> None:
        if (step + 1) % args.log_every == 0 or step + 1 == tc.steps:
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"step {step + 1}/{tc.steps}  loss {loss:.3f}  heads "
                  f"{' '.join(f'{h:.2f}' for h in heads)}  ({rate:.1f} steps/s)", file=sys.stderr)

    result = trainer.train(cfg, init, distilled.hidden, train_set, tc, on_step=on_step)
    trained_eval = trainer.evaluate(cfg, result.weights, distilled.hidden, held_set)
    greedy = ~distilled.sampled[held_set.sequences]
    print(_table(cfg.n_predict, init_eval, trained_eval,
                 trained_eval.subset(greedy) if greedy.any() else None))

    from arctic_jax.speculative.draft_checkpoint import save_draft_model

    path = save_draft_model(args.output, cfg, result.weights,
                            base_model_archs=list(distilled.architectures), fmt=args.format)
    print(f"checkpoint: {args.output} ({Path(path).name})")
    return 0
