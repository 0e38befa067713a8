"""The ``arctic-jax distill-swiftkv`` subcommand: distil a Llama model into its SwiftKV student on
the model's own answers to varied prompts, print the student's quality against the teacher on
held-out prompts (at initialisation and trained) and both models' greedy answers to fixed
prompts, and write the student as an HF checkpoint in Snowflake's layout that ``serve`` loads.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

from arctic_jax.cli_args import add_model_args, engine_kwargs, parse_dtype
from arctic_jax.training.cli_command import add_data_args, generation_settings

# Fixed factual and chat prompts answered greedily by the teacher and by the trained student.
ANSWER_PROMPTS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Who wrote the play Romeo and Juliet?",
    "What is the boiling point of water at sea level in degrees Celsius?",
    "Write a short, friendly message wishing a colleague a happy birthday.",
    "Give me two tips for sleeping better.",
)


def register(sub: Any) -> None:
    """Add ``distill-swiftkv`` to the subparsers ``sub``."""
    p = sub.add_parser("distill-swiftkv", help="distil a Llama model into a SwiftKV model (its later "
                                               "layers' K/V from one earlier hidden state) on its "
                                               "own generations; write it in Snowflake's layout")
    add_model_args(p)
    s = p.add_argument_group("SwiftKV student")
    s.add_argument("--num-key-value-layers", type=int, default=None,
                   help="Lkv: layers every token runs; the K/V of the later ones come from the "
                        "residual entering layer Lkv (default: half the layers)")
    s.add_argument("--group-size", type=int, default=1,
                   help="AcrossKV: later layers sharing one K/V (must divide L - Lkv; 2 halves "
                        "their KV cache)")
    add_data_args(p.add_argument_group("data (the teacher's own generations)"),
                  ".npz file of the generations (train-speculator's format, shared with it): "
                  "read when it exists (same settings), else written")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    t.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence row; longer sequences are cut (reported) "
                        "(default: the longest sequence, rounded up to a multiple of 32)")
    t.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (5%% linear warm-up, cosine decay, no weight decay); "
                        "the paper's 2e-4 is for 8B models and ~1M sequences")
    t.add_argument("--kl-temperature", type=float, default=2.0)
    t.add_argument("--mse-weight", type=float, default=1.0,
                   help="weight of the MSE of the residual entering the last layer")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=20, help="steps between loss lines on stderr")
    t.add_argument("--answer-tokens", type=int, default=48,
                   help="greedy tokens of the fixed prompts' answers (0: skip them)")
    t.add_argument("--output", required=True, help="checkpoint directory to write (new or empty)")
    p.set_defaults(func=cmd_distill_swiftkv)


def _source(model: str) -> str:
    import checkpoints
    path = checkpoints.default_model_path() if model in ("default", None) else os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model source {path} does not exist")
    return path


def _teacher_config(path: str) -> Any:
    """The SwiftKV student's config, from the teacher's config alone (no weights), so bad
    arguments fail before anything long runs."""
    from checkpoints import gguf_file, hf_safetensors

    if hf_safetensors.is_hf_checkpoint_dir(path):
        spec, cfg = hf_safetensors.read_hf_config(path)
    else:
        spec, cfg = gguf_file.read_gguf_config(path)
    if spec.name != "llama":
        raise ValueError(f"the teacher must be a plain Llama model, {path} is a {spec.name!r} model")
    return cfg


def check_args(args: argparse.Namespace) -> Any:
    """Fail before the long part: returns the student's SwiftKVConfig."""
    from arctic_jax.training.swiftkv_distill import swiftkv_config
    from arctic_jax.training.swiftkv_export import check_output_dir

    if (args.tensor_parallel_size > 1 or args.sequence_parallel_size > 1 or args.parallel_mode
            or args.enable_shift_parallel):
        raise ValueError("distill-swiftkv runs on one device: drop the tensor/sequence/shift "
                         "parallel flags")
    check_output_dir(args.output)
    for name in ("steps", "batch_size", "num_prompts", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.answer_tokens < 0:
        raise ValueError(f"--answer-tokens must be >= 0, got {args.answer_tokens}")
    return swiftkv_config(_teacher_config(_source(args.model)), args.num_key_value_layers,
                          args.group_size)


def _llm(args: argparse.Namespace, model: str, tokenizer: Any, conversations: list,
         max_tokens: int) -> Any:
    """An engine for ``model``, its ``max_model_len`` (unless given) the longest prompt plus
    ``max_tokens``."""
    from arctic_jax.llm import LLM
    from arctic_jax.tokenizer import encode_chat

    kwargs = engine_kwargs(args)
    if "max_model_len" not in kwargs:
        longest = max(len(encode_chat(tokenizer, c)) for c in conversations)
        kwargs["max_model_len"] = -(-(longest + max_tokens) // 64) * 64
    return LLM(model, dtype=parse_dtype(args.dtype),
               compilation_cache_dir=args.compilation_cache_dir, **kwargs)


def _answers(llm: Any, convs: list, max_tokens: int) -> list[str]:
    from arctic_jax.sampling import SamplingParams

    outs = llm.chat(convs, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [o.text for o in outs]


def _sequences(args: argparse.Namespace, llm: Any, conversations: list) -> list[list[int]]:
    """Prompt + answer token ids of every conversation (generated now, or from --data-cache)."""
    from arctic_jax.tokenizer import encode_chat
    from arctic_jax.training import data

    settings = generation_settings(args)
    if args.data_cache and os.path.exists(args.data_cache):
        print(f"data: reading {args.data_cache}", file=sys.stderr)
        distilled = data.load_cached(args.data_cache, settings)
    else:
        start = time.perf_counter()
        distilled = data.distill(llm, conversations, settings)
        print(f"data: {distilled.num_sequences} generations, {distilled.tokens.shape[0]} tokens in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        if args.data_cache:
            distilled.save(args.data_cache)
            print(f"data: cached in {args.data_cache}", file=sys.stderr)
    prompts = [encode_chat(llm.tokenizer, c) for c in conversations]
    if [len(p) for p in prompts] != [int(n) for n in distilled.prompt_lens]:
        raise ValueError("the data's prompt lengths differ from the prompts' tokens under this "
                         "model's chat template: the data cache was made with another tokenizer")
    return [p + [int(t) for t in distilled.tokens[distilled.offsets[s]:distilled.offsets[s + 1]]]
            for s, p in enumerate(prompts)]


def run_distillation(args: argparse.Namespace) -> Any:
    """The whole command; returns its ``swiftkv_distill.DistillReport``."""
    import numpy as np

    from arctic_jax.training import data, prompts, swiftkv_distill, swiftkv_export, trainer
    from arctic_jax.training.cli_command import _tokenizer
    from arctic_jax.training.hidden_states import BaseModel

    cfg = check_args(args)
    source = _source(args.model)
    conversations = prompts.conversations(args.num_prompts, args.seed)
    answer_convs = [[{"role": "user", "content": q}] for q in ANSWER_PROMPTS]
    llm = _llm(args, args.model, _tokenizer(args.model), conversations + answer_convs,
               max(args.max_tokens, args.answer_tokens))
    sequences = _sequences(args, llm, conversations)
    teacher_answers = _answers(llm, answer_convs, args.answer_tokens) if args.answer_tokens else []
    teacher = BaseModel.of_llm(llm)
    tokenizer = llm.tokenizer
    del llm   # frees the engine's KV cache before training
    gc.collect()
    teacher_hf = swiftkv_export.teacher_hf_config(source, teacher.cfg)
    weights = teacher.weights

    train_seqs, held_seqs = data.split_by_prompt(len(sequences), args.held_out_fraction, args.seed)
    longest = max(len(s) for s in sequences)
    seq_len = args.seq_len or -(-longest // 32) * 32
    rows, cut = swiftkv_distill.pack_sequences(sequences, seq_len)
    if cut:
        print(f"data: --seq-len {seq_len} cuts {cut} of {sum(len(s) for s in sequences)} tokens off "
              f"{int(np.sum([len(s) > seq_len for s in sequences]))} sequences", file=sys.stderr)
    train_rows = swiftkv_distill.subset(rows, train_seqs)
    held_rows = swiftkv_distill.subset(rows, held_seqs)
    print(f"distilling: Lkv {cfg.num_key_value_layers} of {cfg.num_layers} layers, group size "
          f"{cfg.key_value_group_size}; {len(train_rows)} training sequences "
          f"({int(train_rows.lengths.sum())} tokens), {len(held_rows)} held out; rows of "
          f"{seq_len} tokens", file=sys.stderr)

    tc = trainer.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=0.0, seed=args.seed)
    lc = swiftkv_distill.LossConfig(temperature=args.kl_temperature, mse_weight=args.mse_weight)
    init = swiftkv_distill.init_trainable(weights, cfg)
    init_quality = swiftkv_distill.evaluate(cfg, weights, init, held_rows, args.batch_size)
    start = time.perf_counter()

    def on_step(step: int, values: Any) -> None:
        if (step + 1) % args.log_every == 0 or step + 1 == tc.steps or step == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"step {step + 1}/{tc.steps}  loss {values[0]:.4f}  KL*T^2 {values[1]:.4f}  "
                  f"MSE {values[2]:.4f}  ({rate:.2f} steps/s)", file=sys.stderr)

    result = swiftkv_distill.train(cfg, weights, init, train_rows, tc, lc, on_step=on_step)
    seconds = time.perf_counter() - start
    trained_quality = swiftkv_distill.evaluate(cfg, weights, result.trainable, held_rows,
                                               args.batch_size)

    student = swiftkv_distill.student_weights(weights, result.trainable, cfg)
    path = swiftkv_export.save_swiftkv_checkpoint(args.output, cfg, teacher_hf, weights, student,
                                                  tokenizer)
    print(f"checkpoint: {args.output} ({path.name})", file=sys.stderr)
    del student
    answers: tuple = ()
    if args.answer_tokens:
        student_llm = _llm(args, args.output, tokenizer, answer_convs, args.answer_tokens)
        student_answers = _answers(student_llm, answer_convs, args.answer_tokens)
        del student_llm
        answers = tuple(swiftkv_distill.AnswerPair(prompt=q, teacher=a, student=b)
                        for q, a, b in zip(ANSWER_PROMPTS, teacher_answers, student_answers,
                                           strict=True))
    return swiftkv_distill.DistillReport(
        num_layers=cfg.num_layers, num_key_value_layers=cfg.num_key_value_layers,
        group_size=cfg.key_value_group_size, steps=tc.steps, train_seconds=seconds,
        losses=result.losses, held_out_prompts=int(held_seqs.shape[0]), init=init_quality,
        trained=trained_quality, answers=answers, checkpoint=os.fspath(args.output))


def cmd_distill_swiftkv(args: argparse.Namespace) -> int:
    report = run_distillation(args)
    print(report.table())
    print(f"checkpoint: {report.checkpoint}")
    return 0
