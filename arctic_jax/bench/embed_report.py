"""Embedding benchmark results: one row per measurement, a table, and a RESULTS.md section
with the peers' figures beside ours.

Throughput is tokens (the inputs' real tokens, padding never counted) over seconds: for the
model forward, from the first launch to the last result on the host; end to end, from the
first request's arrival to the last one's completion. Latency is per request, in ms.
"""
from __future__ import annotations

import dataclasses
import datetime
import platform
from typing import Any

from arctic_jax.bench.embed_drivers import EmbedRun, ForwardResult
from arctic_jax.bench.embed_workload import EmbedWorkload, PaddingStats
from arctic_jax.bench.report import summarize

MODE_FORWARD = "model forward"
MODE_IN_PROCESS = "e2e in-process"
MODE_HTTP = "e2e HTTP"

BERT_BASE_SHAPE = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer's figure: ``tokens_per_s`` for ``mode`` at ``input_len`` tokens per input."""

    system: str
    mode: str           # MODE_FORWARD or "e2e" (a server, end to end)
    input_len: int
    tokens_per_s: float
    conditions: str


# From ../shared/reference/h200-baselines.md (transformers, measured on our H200, 2026-12-01)
# and arctic-inference-facts.md section 5 (the published server figures, one H200).
_TRANSFORMERS = ("H200, BERT-base shape, random fp16 weights, CLS pooling + L2 norm, result "
                 "copied to host, pre-tokenized equal-length batches")
_SERVERS = "published, one H200, snowflake-arctic-embed-m (BERT-base), end to end"
PEERS: tuple[Peer, ...] = (
    Peer("transformers BertModel eager, SDPA, fp16", MODE_FORWARD, 512, 2.12e6,
         f"512 tokens x 256; {_TRANSFORMERS}"),
    Peer("transformers BertModel eager, SDPA, fp16", MODE_FORWARD, 50, 2.11e6,
         f"50 tokens x 2048; {_TRANSFORMERS}"),
    Peer("transformers + torch.compile (max-autotune)", MODE_FORWARD, 512, 2.10e6,
         f"512 tokens x 256; {_TRANSFORMERS}"),
    Peer("Arctic Inference", "e2e", 512, 1.64e6, _SERVERS),
    Peer("Arctic Inference", "e2e", 50, 1.41e6, _SERVERS),
    Peer("TEI", "e2e", 512, 1.62e6, _SERVERS),
    Peer("TEI", "e2e", 50, 0.61e6, _SERVERS),
    Peer("vLLM", "e2e", 512, 0.39e6, _SERVERS),
    Peer("vLLM", "e2e", 50, 0.09e6, _SERVERS),
)
COMPUTE_LIMIT = ("about 4M tok/s for BERT-base (about 0.19 GFLOP per 512-context token at "
                 "790 TFLOP/s)")
GOALS = ("Issue 15 goals (H200, BERT-base): model forward >= 3.0M tok/s at 512 tokens and "
         ">= 2.5M at 50; end to end over HTTP from text >= 2.0M at 512 and >= 1.6M at 50")


def peer_for(mode: str, input_len: int | None) -> Peer | None:
    """The peer our row is compared with: transformers eager for the model forward, Arctic
    Inference's server for ours over HTTP (in-process rows have none: no HTTP); None unless
    the workload has a fixed length a peer measured."""
    want = {MODE_FORWARD: MODE_FORWARD, MODE_HTTP: "e2e"}.get(mode)
    for p in PEERS:
        if p.mode == want and p.input_len == input_len:
            return p
    return None


def is_bert_base_shape(cfg: Any) -> bool:
    return all(getattr(cfg, k, None) == v for k, v in BERT_BASE_SHAPE.items())


# --------------------------------------------------------------------- rows
def _row(mode: str, workload: EmbedWorkload, *, inputs: int, tokens: int, seconds: float,
         padding: PaddingStats | None, **extra: Any) -> dict[str, Any]:
    return {"mode": mode, "workload": workload.description, "workload_label": workload.label,
            "inputs": inputs, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "latency_ms": None, "failed": 0,
            "padding_saved_percent": None if padding is None else padding.saved_percent,
            **extra}


def forward_row(result: ForwardResult, workload: EmbedWorkload,
                padding: PaddingStats | None) -> dict[str, Any]:
    """The model-forward row; ``padding`` of the timed batches (mixed lengths only)."""
    return _row(MODE_FORWARD, workload, inputs=result.num_inputs, tokens=result.num_tokens,
                seconds=result.seconds, padding=padding, device_batches=result.num_batches,
                token_slots=result.token_slots)


def run_row(mode: str, run: EmbedRun, workload: EmbedWorkload, *, concurrency: int,
            padding: PaddingStats | None) -> dict[str, Any]:
    """An end-to-end row: tokens counted by the driver over the completed requests."""
    ok = [r for r in run.records if r.ok]
    failed = [r for r in run.records if not r.ok]
    row = _row(mode, workload, inputs=sum(r.num_inputs for r in ok),
               tokens=sum(r.tokens for r in ok), seconds=run.end - run.start, padding=padding,
               concurrency=concurrency, batch_size=workload.batch_size,
               requests=len(run.records), info=dict(run.info))
    row["failed"] = len(failed)
    row["errors"] = sorted({r.error for r in failed})[:5]
    row["token_mismatches"] = [r.index for r in ok if r.tokens != r.expected_tokens]
    row["latency_ms"] = summarize([1e3 * r.latency for r in ok])
    return row


# -------------------------------------------------------------------- table
def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.3f}M" if x >= 1e4 else f"{x:,.0f}"


def format_table(rows: list[dict[str, Any]], *, peers: bool = False,
                 comparable: bool = False, input_len: int | None = None) -> str:
    """Markdown table of the rows (plus each row's peer and our ratio to it with ``peers``;
    ratios only where ``comparable``: BERT-base shape)."""
    head = ["mode", "workload", "concurrency x batch", "inputs", "tokens", "seconds", "tokens/s",
            "latency p50 / p99 (ms)", "padding saved"]
    if peers:
        head += ["peer (tokens/s)", "ours / peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        lat = r["latency_ms"]
        cells = [r["mode"], r["workload_label"],
                 f"{r['concurrency']} x {r['batch_size']}" if "concurrency" in r else "-",
                 str(r["inputs"]), str(r["tokens"]), _num(r["seconds"], ".3f"),
                 _rate(r["tokens_per_s"]),
                 "-" if not lat or lat["p50"] is None else f"{lat['p50']:.1f} / {lat['p99']:.1f}",
                 _num(r["padding_saved_percent"], ".1f") + ("%" if r["padding_saved_percent"]
                                                            is not None else "")]
        if peers:
            p = peer_for(r["mode"], input_len)
            cells.append("-" if p is None else f"{p.system}: {_rate(p.tokens_per_s)}")
            cells.append("-" if p is None or not comparable or not r["tokens_per_s"]
                         else f"{r['tokens_per_s'] / p.tokens_per_s:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["failed"]:
            lines.append(f"FAILED ({r['mode']}): {r['failed']} of {r['requests']} requests; "
                         f"e.g. {r['errors'][:2]}")
        if r.get("token_mismatches"):
            lines.append(f"WARNING ({r['mode']}): {len(r['token_mismatches'])} requests counted "
                         f"a token total different from the workload's")
        info = r.get("info") or {}
        if info.get("xla_compiles_during_run"):
            lines.append(f"WARNING ({r['mode']}): {info['xla_compiles_during_run']} XLA "
                         f"compilations during the timed run")
    return "\n".join(lines)


def padding_line(padding: PaddingStats) -> str:
    return (f"{padding.num_batches} device batches of {padding.real_tokens} tokens take "
            f"{padding.packed_slots} token slots packed vs {padding.padded_slots} padded "
            f"[B, max_len] per batch: {padding.saved_percent:.1f}% saved")


# --------------------------------------------------------------- RESULTS.md
def results_section(rows: list[dict[str, Any]], meta: dict[str, Any], *, title: str,
                    compare_note: str = "", now: datetime.datetime | None = None) -> str:
    """A markdown section for benchmarks/RESULTS.md: conditions, our table with the peer each
    row compares with, and every peer figure with its conditions."""
    now = now or datetime.datetime.now(datetime.UTC)
    comparable = bool(meta.get("bert_base_shape"))
    lines = [
        f"## {title}",
        "",
        f"- Date: {now.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Card: {meta.get('card', 'unknown')} (jax {meta.get('jax_version', 'unknown')}, "
        f"Python {meta.get('python_version', platform.python_version())})",
        f"- Model: {meta.get('model', 'unknown')} (dtype {meta.get('dtype', 'unknown')}, "
        f"pooling {meta.get('pooling', 'unknown')})",
        f"- Engine: {meta.get('engine_text', '-')}",
        f"- Workload: {meta.get('workload_text', '-')}",
        f"- Command: `{meta.get('command', '-')}`",
    ]
    if meta.get("padding_text"):
        lines.append(f"- Padding ({meta.get('padding_scope', 'the workload')}): "
                     f"{meta['padding_text']}")
    if compare_note:
        lines.append(f"- Note: {compare_note}")
    lines += ["", format_table(rows, peers=True, comparable=comparable,
                               input_len=meta.get("input_len")), ""]
    if not comparable:
        lines += ["Ratios to peers are left out: the peers ran the BERT-base shape.", ""]
    lines += [f"The peers ran on an H200; ours on {meta.get('card', 'unknown')}.", ""]
    lines += ["Peers:", "", "| system | mode | input tokens | tokens/s | conditions |",
              "|---|---|---:|---:|---|"]
    lines += [f"| {p.system} | {p.mode} | {p.input_len} | {_rate(p.tokens_per_s)} | "
              f"{p.conditions} |" for p in PEERS]
    lines += ["", f"Compute limit: {COMPUTE_LIMIT}. {GOALS}.", ""]
    return "\n".join(lines) + "\n"
