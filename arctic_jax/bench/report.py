"""Benchmark statistics and their presentation: a table, JSON, a PNG plot, RESULTS.md.

Definitions (per request, from its ``RequestRecord``):

- TTFT: arrival -> first token delivered.
- E2E: arrival -> last update (completion time).
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined for one-token outputs.
- ITL: time between successive token deliveries; a delivery carrying k tokens
  after a gap g counts as k latencies of g / k (tokens that arrive together
  with the first token count as 0), so a request's ITLs sum to the time from
  its first to its last token (E2E - TTFT, less the end-of-stream delay).

Throughputs divide by the wall time from the first arrival to the last
completion. Latencies are reported in milliseconds.
"""
from __future__ import annotations

import datetime
import importlib.util
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from arctic_jax.bench.runner import RequestRecord, RunResult

PERCENTILES = (50, 95, 99)
LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                   ("e2e_ms", "E2E"))


# ------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics.

    Rank q/100 * (n - 1) of the sorted values (numpy's default "linear" method).
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of no values")
    rank = q / 100.0 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p95, p99, max of the values (None for statistics of no values)."""
    xs = [float(v) for v in values]
    out: dict[str, float | int | None] = {"count": len(xs)}
    if not xs:
        out.update({"mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None})
        return out
    out["mean"] = math.fsum(xs) / len(xs)
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    out["max"] = max(xs)
    return out


def ttft(record: RequestRecord) -> float:
    return record.first_token - record.arrival


def e2e(record: RequestRecord) -> float:
    return record.end - record.arrival


def tpot(record: RequestRecord) -> float | None:
    if record.output_tokens < 2:
        return None
    return (record.end - record.first_token) / (record.output_tokens - 1)


def inter_token_latencies(record: RequestRecord) -> list[float]:
    """ITLs of one request in seconds (see the module docstring)."""
    if not record.deliveries:
        return []
    t_prev, k0 = record.deliveries[0]
    out = [0.0] * (k0 - 1)
    for t, k in record.deliveries[1:]:
        out.extend([(t - t_prev) / k] * k)
        t_prev = t
    return out


# ---------------------------------------------------------------------- report
def build_report(result: RunResult, meta: dict | None = None) -> dict[str, Any]:
    """The JSON-able report of a run: throughput, latency statistics, per-request rows."""
    records = result.records
    ok = [r for r in records if r.ok]
    duration = result.end - result.start
    in_tokens = sum(r.prompt_len or 0 for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    def ms(xs: Iterable[float]) -> list[float]:
        return [1e3 * x for x in xs]
    length_mismatches = [r.index for r in ok if r.ignore_eos and r.output_tokens != r.max_tokens]
    report: dict[str, Any] = {
        "meta": dict(meta or {}),
        "num_requests": len(records),
        "num_completed": len(ok),
        "num_failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:10],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "unknown_input_lengths": sum(r.prompt_len is None for r in ok),
        "length_mismatches": length_mismatches,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": out_tokens / duration if duration > 0 else None,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else None,
        "ttft_ms": summarize(ms(ttft(r) for r in ok)),
        "tpot_ms": summarize(ms(t for t in (tpot(r) for r in ok) if t is not None)),
        "itl_ms": summarize(ms(x for r in ok for x in inter_token_latencies(r))),
        "e2e_ms": summarize(ms(e2e(r) for r in ok)),
        "info": dict(result.info),
        "requests": [_request_row(r, result.start) for r in records],
    }
    return report


def _request_row(r: RequestRecord, t0: float) -> dict[str, Any]:
    row = {"index": r.index, "prompt_tokens": r.prompt_len, "max_tokens": r.max_tokens,
           "output_tokens": r.output_tokens, "finish_reason": r.finish_reason,
           "arrival_s": r.arrival - t0, "error": r.error}
    if r.ok:
        t = tpot(r)
        row.update(ttft_ms=1e3 * ttft(r), e2e_ms=1e3 * e2e(r),
                   tpot_ms=None if t is None else 1e3 * t, num_deliveries=len(r.deliveries))
    return row


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """A compact markdown table: latency percentiles, then throughput lines."""
    lines = ["| metric (ms) | mean | p50 | p95 | p99 |", "|---|---:|---:|---:|---:|"]
    for key, label in LATENCY_METRICS:
        s = report[key]
        lines.append(f"| {label} | {_fmt(s['mean'])} | {_fmt(s['p50'])} | {_fmt(s['p95'])} "
                     f"| {_fmt(s['p99'])} |")
    lines += [
        "",
        f"requests: {report['num_completed']}/{report['num_requests']} completed in "
        f"{report['duration_s']:.2f} s ({_fmt(report['request_throughput'], 3)} req/s)",
        f"output tokens/s: {_fmt(report['output_throughput'], 1)}   "
        f"total (in+out) tokens/s: {_fmt(report['total_token_throughput'], 1)}   "
        f"tokens in/out: {report['total_input_tokens']}/{report['total_output_tokens']}",
    ]
    spec = report["info"].get("speculation")
    if spec:
        by_pos = " ".join(f"{r:.2f}" for r in spec["acceptance_rate_by_position"])
        lines.append(f"speculation: drafted {spec['num_drafted_tokens']} tokens, accepted "
                     f"{spec['num_accepted_tokens']} ({spec['acceptance_rate']:.1%}); acceptance by "
                     f"position: {by_pos or '-'}; mean tokens per step per request: "
                     f"{spec['mean_tokens_per_step']:.2f}")
        gov = spec.get("governor")
        if gov and gov["batch_size"]:
            on, off = gov["steps_speculating"], gov["steps_not_speculating"]
            rates = "; ".join(f"{_fmt(a, 1)} with, {_fmt(b, 1)} without" for a, b in gov["rates"])
            lines.append(f"governor: above {gov['batch_size']} running requests, {on} steps speculated "
                         f"and {off} did not (last measured tokens/s per request: {rates})")
    if report["num_failed"]:
        lines.append(f"FAILED: {report['num_failed']} requests; e.g. {report['errors'][:3]}")
    if report["length_mismatches"]:
        lines.append(f"WARNING: {len(report['length_mismatches'])} ignore_eos requests did not "
                     f"produce exactly max_tokens tokens")
    if report["unknown_input_lengths"]:
        lines.append(f"NOTE: input length unknown for {report['unknown_input_lengths']} "
                     f"requests (counted as 0)")
    return "\n".join(lines)


# ------------------------------------------------------------------------ plot
def check_plotting_available() -> None:
    """Raise ImportError now (not after the run) if matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("--plot needs matplotlib (pip install matplotlib)")


def _cdf(ax: Any, values_ms: Iterable[float], label: str) -> None:
    xs = np.sort(np.asarray(list(values_ms), dtype=np.float64))
    if xs.size:
        ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)


def write_plot(result: RunResult, path: str | os.PathLike, title: str = "") -> None:
    """PNG with CDFs of TTFT, TPOT/ITL and E2E, and cumulative output tokens over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.records if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a_ttft, a_tpot), (a_e2e, a_tok) = axes
    _cdf(a_ttft, (1e3 * ttft(r) for r in ok), "TTFT")
    _cdf(a_tpot, (1e3 * t for t in (tpot(r) for r in ok) if t is not None), "TPOT (per request)")
    _cdf(a_tpot, (1e3 * x for r in ok for x in inter_token_latencies(r)), "ITL (per token)")
    _cdf(a_e2e, (1e3 * e2e(r) for r in ok), "E2E")
    for ax, name in ((a_ttft, "TTFT"), (a_tpot, "TPOT / ITL"), (a_e2e, "completion time")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if ax is not a_tpot else "fraction")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    events = sorted((t - result.start, k) for r in ok for t, k in r.deliveries)
    if events:
        times = np.array([t for t, _ in events])
        a_tok.step(times, np.cumsum([k for _, k in events]), where="post", label="output tokens")
        arrivals = np.sort([r.arrival - result.start for r in result.records])
        ax2 = a_tok.twinx()
        ax2.step(arrivals, np.arange(1, arrivals.size + 1), where="post", color="tab:orange",
                 alpha=0.6, label="requests arrived")
        ax2.set_ylabel("requests arrived")
        handles = a_tok.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        a_tok.legend(handles, [h.get_label() for h in handles], loc="upper left")
    a_tok.set_xlabel("time since first arrival (s)")
    a_tok.set_ylabel("cumulative output tokens")
    a_tok.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------- RESULTS.md
def results_section(report: dict[str, Any], *, title: str, compare_note: str = "",
                    now: datetime.datetime | None = None) -> str:
    """A markdown section for benchmarks/RESULTS.md."""
    meta = report["meta"]
    now = now or datetime.datetime.now(datetime.UTC)
    engine = meta.get("engine_config") or {}
    engine_text = ", ".join(f"{k}={v}" for k, v in engine.items()) or "-"
    num_devices = meta.get("num_devices", 1)
    lines = [
        f"## {title}",
        "",
        f"- Date: {now.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Card: {meta.get('card', 'unknown')}"
        f"{f' x{num_devices}' if num_devices > 1 else ''} "
        f"(jax {meta.get('jax_version', 'unknown')})",
        f"- Model: {meta.get('model', 'unknown')} (dtype {meta.get('dtype', 'unknown')})",
        f"- Driver: {meta.get('driver', 'unknown')}",
        f"- Engine: {engine_text}",
        f"- Workload: {meta.get('workload_text', '-')}",
        f"- Load: {meta.get('load_text', '-')}",
        f"- Compare: {compare_note or '-'}",
        "",
        format_table(report),
        "",
    ]
    return "\n".join(lines) + "\n"


def append_results(path: str | os.PathLike, section: str) -> None:
    """Append a section to a markdown file, creating it (with a heading) if needed."""
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by `arctic-jax bench --append-results`.\n\n")
        f.write(section)
