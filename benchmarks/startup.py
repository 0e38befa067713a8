"""Start-up of the embedded model as a new user meets it: ``generate`` and ``serve``, cold
(a fresh cache root: converted weights, tokenizer and compiled programs all rebuilt) and warm
(the same root again), each as a separate process, against the first-run goals.

- ``generate --chat``: wall time and the process's peak RSS (``wait4``'s ``ru_maxrss``).
- ``serve --model default``: seconds until ``/health`` answers 200, then RSS while serving
  (the peak of the process's ``VmRSS`` sampled over a few chat requests), and whether the
  answers are right.

    python benchmarks/startup.py [--runs 2] [--append-results]

Each measurement runs ``--runs`` times (a new cache root for every cold run); the table shows
the median and the range. Run it on an otherwise idle machine: it times whole processes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
QUESTION = "What is the capital of France?"
GOALS = {  # issue 16, on a 2-core CPU
    ("generate", "cold"): (30.0, None), ("generate", "warm"): (6.0, 1.5),
    ("serve", "cold"): (60.0, 2.0), ("serve", "warm"): (15.0, 2.0),
}


def _cli() -> list[str]:
    return [sys.executable, "-m", "arctic_jax.cli"]


def _env(cache_root: str) -> dict[str, str]:
    return {**os.environ, "ARCTIC_JAX_CACHE": cache_root, "PYTHONPATH": ROOT}


def time_generate(cache_root: str) -> dict:
    """One ``generate --chat`` process: wall seconds, peak RSS (GiB), its answer."""
    cmd = _cli() + ["generate", "--chat", "--prompt", QUESTION, "--temperature", "0",
                    "--max-tokens", "32"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(cache_root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"generate failed ({proc.returncode}):\n{err[-2000:]}")
    return {"seconds": wall, "rss_gib": usage.ru_maxrss / 2**20, "answer": out.strip()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_gib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _chat(port: int) -> str:
    body = json.dumps({"model": "default", "temperature": 0, "max_tokens": 32,
                       "messages": [{"role": "user", "content": QUESTION}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def time_serve(cache_root: str, requests: int, timeout: float = 900.0) -> dict:
    """One ``serve --model default`` process: seconds to ``/health`` 200, the peak RSS while
    ``requests`` chat requests (4 at a time) are answered, the answer."""
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(_cli() + ["serve", "--model", "default", "--port", str(port)],
                            env=_env(cache_root), stdout=log, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: "
                                   f"{open(log.name).read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - start > timeout:
                raise TimeoutError("serve was not ready in time")
            time.sleep(0.2)
        ready = time.perf_counter() - start
        peak = [_rss_gib(proc.pid)]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(_rss_gib(proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        answers: list[str] = []
        workers = [threading.Thread(target=lambda: answers.extend(
            _chat(port) for _ in range(requests // 4))) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        done.set()
        sampler.join()
        return {"seconds": ready, "rss_gib": max(peak), "answer": answers[0] if answers else "",
                "same_answers": len(set(answers)) == 1 and len(answers) == requests // 4 * 4}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(log.name)


def measure(kind: str, runs: int, requests: int) -> dict[str, list[dict]]:
    """``runs`` cold starts (each in a new cache root) and as many warm ones (in the last)."""
    out: dict[str, list[dict]] = {"cold": [], "warm": []}
    fn = time_generate if kind == "generate" else lambda root: time_serve(root, requests)
    for _ in range(runs):
        root = tempfile.mkdtemp(prefix="arctic-jax-startup-")
        try:
            out["cold"].append(fn(root))
            out["warm"].append(fn(root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


def _fmt(values: list[float], digits: int = 1) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    lines = ["| command | cache | seconds | goal (s) | peak RSS (GiB) | goal (GiB) | answer |",
             "|---|---|---:|---:|---:|---:|---|"]
    for kind, by_state in results.items():
        for state, runs in by_state.items():
            goal_s, goal_gib = GOALS[kind, state]
            lines.append(
                f"| {kind} | {state} | {_fmt([r['seconds'] for r in runs])} | ≤ {goal_s:g} | "
                f"{_fmt([r['rss_gib'] for r in runs], 2)} | "
                f"{'-' if goal_gib is None else f'≤ {goal_gib:g}'} | {runs[0]['answer'][:40]!r} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2, help="cold+warm pairs per command")
    p.add_argument("--requests", type=int, default=8, help="chat requests while serving")
    p.add_argument("--only", choices=("generate", "serve"), default=None)
    p.add_argument("--append-results", action="store_true")
    args = p.parse_args(argv)
    kinds = [args.only] if args.only else ["generate", "serve"]
    results = {k: measure(k, args.runs, args.requests) for k in kinds}
    text = table(results)
    cpus = os.cpu_count()
    head = (f"{platform.processor() or platform.machine()}, {cpus} CPUs, Python "
            f"{platform.python_version()}, {datetime.date.today()}")
    print(head)
    print(text)
    if args.append_results:
        import jax

        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(f"\n## Start-up of the embedded model (issue 16): {head}, jax {jax.__version__}"
                    f"\n\n`python benchmarks/startup.py --runs {args.runs}` (median and range; cold ="
                    f" a fresh cache root, warm = the same root again; whole processes)\n\n"
                    f"{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
