"""The benchmark harness: statistics against numpy, Poisson arrivals, the load generator with a
fake driver, the HTTP driver against a mock SSE server, and a full in-process CLI run on a tiny
random-weight model (exact output lengths, report consistency, JSON, PNG, RESULTS.md)."""
from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np
import pytest

from arctic_jax.bench import report as rep
from arctic_jax.bench import runner
from arctic_jax.bench import workload as wl
from arctic_jax.engine.replicas import build_replicas


def fresh_rng() -> tuple[np.random.Generator, int]:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    return np.random.default_rng(seed), seed


# ------------------------------------------------------------------ statistics
def test_percentile_matches_numpy():
    rng, _ = fresh_rng()
    for n in (1, 2, 3, 10, 101, 2000):
        values = rng.lognormal(0.0, 1.0, size=n)
        qs = [0, 50, 95, 99, 100, *rng.uniform(0, 100, size=5)]
        for q in qs:
            assert rep.percentile(list(values), q) == pytest.approx(np.percentile(values, q),
                                                                    rel=1e-12, abs=0)
        s = rep.summarize(values)
        assert s["count"] == n
        assert s["mean"] == pytest.approx(np.mean(values), rel=1e-12)
        for q in rep.PERCENTILES:
            assert s[f"p{q}"] == pytest.approx(np.percentile(values, q), rel=1e-12)
        assert s["max"] == values.max()


def test_percentile_rejects_bad_input_and_summary_of_nothing():
    with pytest.raises(ValueError, match="no values"):
        rep.percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        rep.percentile([1.0], 101)
    s = rep.summarize([])
    assert s["count"] == 0 and s["mean"] is None and s["p99"] is None


def test_inter_token_latencies_split_multi_token_deliveries():
    rng, _ = fresh_rng()
    t = np.cumsum(rng.uniform(0.01, 0.1, size=4))
    rec = runner.RequestRecord(index=0, prompt_len=5, max_tokens=7, ignore_eos=True,
                               arrival=t[0] - 0.2)
    for time_, k in zip(t, (2, 1, 3, 1), strict=True):
        rec.add_delivery(float(time_), k)
    rec.end = float(t[-1])
    itl = rep.inter_token_latencies(rec)
    expected = [0.0, t[1] - t[0], *[(t[2] - t[1]) / 3] * 3, t[3] - t[2]]
    np.testing.assert_allclose(itl, expected, rtol=1e-12)
    assert len(itl) == rec.output_tokens - 1
    assert sum(itl) == pytest.approx(rep.e2e(rec) - rep.ttft(rec))
    assert rep.tpot(rec) == pytest.approx(np.mean(itl))
    assert rep.ttft(rec) == pytest.approx(0.2)


# -------------------------------------------------------------------- workload
def test_poisson_arrivals_have_the_requested_rate():
    rng, seed = fresh_rng()
    rate = float(rng.uniform(0.5, 50.0))
    n = 20_000
    offsets = wl.poisson_arrival_offsets(n, rate, seed)
    assert offsets.shape == (n,) and offsets[0] == 0.0
    gaps = np.diff(offsets)
    assert (gaps >= 0).all()
    # Mean gap 1/rate with standard error (1/rate)/sqrt(n-1); allow 5 standard errors.
    assert abs(gaps.mean() - 1 / rate) < 5 * (1 / rate) / math.sqrt(n - 1)
    assert (n - 1) / offsets[-1] == pytest.approx(rate, rel=5 / math.sqrt(n - 1))
    # Exponential gaps: standard deviation equals the mean.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_array_equal(offsets, wl.poisson_arrival_offsets(n, rate, seed))
    assert not np.array_equal(offsets, wl.poisson_arrival_offsets(n, rate, seed + 1))
    np.testing.assert_array_equal(wl.poisson_arrival_offsets(4, math.inf, 0), np.zeros(4))
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="rate"):
            wl.poisson_arrival_offsets(4, bad, 0)


def test_synthetic_requests_respect_ranges():
    rng, seed = fresh_rng()
    reqs = wl.synthetic_requests(200, wl.parse_range("3:9", "in"), wl.parse_range("5", "out"),
                                 vocab_size=37, seed=seed)
    assert [r.index for r in reqs] == list(range(200))
    lens = [r.prompt_len for r in reqs]
    assert min(lens) == 3 and max(lens) == 9  # 200 draws cover a range of 7 values
    assert all(r.max_tokens == 5 and r.ignore_eos for r in reqs)
    ids = np.concatenate([r.prompt for r in reqs])
    assert ids.min() >= 0 and ids.max() < 37
    for bad in ("9:3", "0:4", "a:b", "1:2:3"):
        with pytest.raises(ValueError):
            wl.parse_range(bad, "--input-len-range")


def test_dataset_loading_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello", "max_tokens": 4}\n\n'
                    '{"prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": true}\n')
    reqs = wl.load_dataset(path)
    assert reqs[0].prompt == "hello" and reqs[0].prompt_len is None and not reqs[0].ignore_eos
    assert reqs[1].prompt == (5, 6, 7) and reqs[1].max_tokens == 2 and reqs[1].ignore_eos
    assert len(wl.load_dataset(path, 1)) == 1
    with pytest.raises(ValueError, match="fewer than"):
        wl.load_dataset(path, 3)
    for line, msg in (('{"prompt": [], "max_tokens": 1}', "non-empty"),
                      ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
                      ('{"prompt": "x", "max_tokens": 1, "temp": 1}', "unknown"),
                      ('[1, 2]', "JSON object"), ('{"prompt": "x"', "valid JSON")):
        path.write_text(line + "\n")
        with pytest.raises(ValueError, match=msg):
            wl.load_dataset(path)


# ------------------------------------------------------------- load generation
class FakeDriver:
    """Emits ``max_tokens`` single-token deliveries, ``gap`` seconds apart; tracks concurrency."""

    def __init__(self, gap: float):
        self.gap = gap
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self, request, record):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for _ in range(request.max_tokens):
                await asyncio.sleep(self.gap)
                record.add_delivery(time.perf_counter(), 1)
            record.finish_reason = "length"
        finally:
            self.in_flight -= 1


def _requests(n, out=3):
    return [wl.BenchRequest(index=i, prompt=(1, 2, 3), max_tokens=out, ignore_eos=True)
            for i in range(n)]


def test_closed_loop_keeps_concurrency():
    driver = FakeDriver(gap=0.002)
    result = asyncio.run(runner.run_load(driver, _requests(9), concurrency=3))
    assert driver.max_in_flight == 3
    assert [r.index for r in result.records] == list(range(9))
    assert all(r.ok and r.output_tokens == 3 for r in result.records)
    # Clients start their next request right after the previous one ends.
    arrivals = sorted(r.arrival for r in result.records)
    assert arrivals[3] >= min(r.end for r in result.records)
    assert result.end == max(r.end for r in result.records)


def test_open_loop_follows_arrival_offsets():
    _, seed = fresh_rng()
    offsets = wl.poisson_arrival_offsets(12, 200.0, seed)
    driver = FakeDriver(gap=0.001)
    result = asyncio.run(runner.run_load(driver, _requests(12), arrival_offsets=offsets))
    measured = np.array([r.arrival for r in result.records]) - result.start
    assert np.all(measured >= offsets - 1e-3)
    assert np.all(measured <= offsets + 0.05)  # event-loop scheduling slack
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(runner.run_load(driver, _requests(2)))


def test_failed_request_is_recorded_not_fatal():
    class Failing(FakeDriver):
        async def send(self, request, record):
            if request.index == 1:
                raise RuntimeError("boom")
            await super().send(request, record)

    result = asyncio.run(runner.run_load(Failing(0.001), _requests(3), concurrency=2))
    report = rep.build_report(result)
    assert report["num_failed"] == 1 and report["num_completed"] == 2
    assert "boom" in report["errors"][0]
    assert report["ttft_ms"]["count"] == 2


# ------------------------------------------------------------------ HTTP driver
def _sse_server(seen: list, *, tokens_per_chunk: int, usage: bool, status: int = 200):
    httpx = pytest.importorskip("httpx")

    async def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "served-x"}]})
        body = json.loads(request.content)
        seen.append(body)
        if status != 200:
            return httpx.Response(status, json={"error": "bad request"})
        n = body["max_tokens"]

        async def stream():
            sent = 0
            while sent < n:
                k = min(tokens_per_chunk, n - sent)
                sent += k
                choice = {"index": 0, "text": "ab" * k, "finish_reason": "length" if sent == n else None}
                if tokens_per_chunk > 1:
                    choice["token_ids"] = list(range(k))
                await asyncio.sleep(0.001)
                yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
            if usage:
                u = {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n}
                yield f"data: {json.dumps({'choices': [], 'usage': u})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("tokens_per_chunk,usage", [(1, False), (2, True)])
def test_http_driver_streams_and_counts_tokens(tokens_per_chunk, usage):
    seen: list = []
    requests = [wl.BenchRequest(index=0, prompt=(4, 5, 6), max_tokens=5, ignore_eos=True),
                wl.BenchRequest(index=1, prompt="some text", max_tokens=3, ignore_eos=False)]
    result = runner.run_http("http://bench.test", "default", requests, concurrency=2,
                             transport=_sse_server(seen, tokens_per_chunk=tokens_per_chunk,
                                                   usage=usage))
    assert result.info["served_model"] == "served-x"
    warm, *timed = seen
    assert warm["max_tokens"] == 2
    body = next(b for b in timed if b["prompt"] == [4, 5, 6])
    assert body["stream"] is True and body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["model"] == "served-x"
    assert any(b["prompt"] == "some text" and b["ignore_eos"] is False for b in timed)
    r0, r1 = result.records
    assert r0.ok and r0.output_tokens == 5 and r0.finish_reason == "length"
    assert len(r0.deliveries) == math.ceil(5 / tokens_per_chunk)
    assert r1.output_tokens == 3
    assert r1.prompt_len == (11 if usage else None)
    assert rep.build_report(result)["length_mismatches"] == []


def test_http_error_is_reported():
    seen: list = []
    requests = [wl.BenchRequest(index=0, prompt=(4, 5), max_tokens=2, ignore_eos=True)]
    result = runner.run_http("http://bench.test", "m", requests, concurrency=1, warmup_requests=0,
                             transport=_sse_server(seen, tokens_per_chunk=1, usage=False,
                                                   status=400))
    assert not result.records[0].ok
    assert "HTTP 400" in result.records[0].error


# ----------------------------------------------------------- in-process (CLI)
def bench_cli(argv):
    """Parse and run ``arctic-jax bench ARGV`` (without ``cli.main``'s logging set-up)."""
    from arctic_jax import cli

    args = cli.build_parser().parse_args(["bench", *argv])
    return args.func(args)


OUTPUT_LEN = 6
NUM_REQUESTS = 5


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {"json": d / "r.json", "png": d / "r.png", "md": d / "RESULTS.md"}
    rc = bench_cli(["--random-weights", "tiny", "--num-requests", str(NUM_REQUESTS),
                   "--concurrency", "2", "--input-len-range", "4:20", "--output-len",
                   str(OUTPUT_LEN), "--seed", "3", "--max-num-seqs", "4",
                   "--max-num-batched-tokens", "32", "--max-model-len", "64", "--page-size", "8",
                   "--output-json", str(paths["json"]), "--plot", str(paths["png"]),
                   "--append-results", str(paths["md"]), "--title", "tiny smoke run",
                   "--compare-note", "floor: nothing"])
    return rc, paths, json.loads(paths["json"].read_text())


def test_in_process_run_exact_lengths_and_sane_report(cli_run):
    rc, _, report = cli_run
    assert rc == 0
    for key in ("meta", "num_requests", "num_completed", "num_failed", "duration_s",
                "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms",
                "e2e_ms", "requests", "info"):
        assert key in report, key
    assert report["num_requests"] == report["num_completed"] == NUM_REQUESTS
    assert report["num_failed"] == 0 and report["length_mismatches"] == []
    assert report["info"]["xla_compiles_during_run"] == 0  # every bucket was compiled in warm-up
    rows = report["requests"]
    assert [r["index"] for r in rows] == list(range(NUM_REQUESTS))
    for r in rows:
        assert r["output_tokens"] == OUTPUT_LEN and r["finish_reason"] == "length"
        assert 4 <= r["prompt_tokens"] <= 20
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / (OUTPUT_LEN - 1))
    assert report["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
    assert report["total_input_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert report["duration_s"] >= max(r["arrival_s"] + r["e2e_ms"] / 1e3 for r in rows) - 1e-9
    assert report["output_throughput"] == pytest.approx(
        report["total_output_tokens"] / report["duration_s"])
    assert report["total_token_throughput"] == pytest.approx(
        (report["total_input_tokens"] + report["total_output_tokens"]) / report["duration_s"])
    assert report["request_throughput"] == pytest.approx(NUM_REQUESTS / report["duration_s"])
    assert report["itl_ms"]["count"] == NUM_REQUESTS * (OUTPUT_LEN - 1)
    # Equal-length outputs: mean ITL is mean TPOT, up to the short end-of-stream delay in E2E.
    assert report["itl_ms"]["mean"] == pytest.approx(report["tpot_ms"]["mean"], rel=0.1)
    assert report["itl_ms"]["mean"] <= report["tpot_ms"]["mean"]
    ttfts = [r["ttft_ms"] for r in rows]
    assert report["ttft_ms"]["p50"] == pytest.approx(np.percentile(ttfts, 50))
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = report[key]
        assert 0 <= s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
    meta = report["meta"]
    assert meta["model"] == "random-weights:tiny" and meta["card"]
    assert meta["engine_config"]["max_model_len"] == 64 and meta["warmup_s"] > 0


def test_in_process_run_writes_png_and_results(cli_run):
    _, paths, _ = cli_run
    png = paths["png"].read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert md.startswith("# Benchmark results")
    assert "## tiny smoke run" in md and "- Compare: floor: nothing" in md
    assert "| TTFT |" in md and "random-weights:tiny" in md and "jax " in md


def test_data_parallel_replicas_each_serve_on_their_own_device():
    import jax

    devices = jax.devices()[:2]
    kwargs = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=8,
                  token_buckets=(8, 32), page_buckets=(8,))
    engines, _ = build_replicas(lambda kw: runner.build_random_engine("tiny", kw), kwargs, 2)
    assert engines[1].sched_config.num_pages == engines[0].sched_config.num_pages
    for engine in engines:
        runner.warmup_engine(engine, progress=False)
    requests = wl.synthetic_requests(8, wl.LengthRange(4, 20), wl.LengthRange(5, 5), 101, 4)
    result = runner.run_in_process(engines, requests, concurrency=4)
    assert all(r.ok and r.output_tokens == 5 for r in result.records)
    assert result.info["xla_compiles_during_run"] == 0 and result.info["replicas"] == 2
    routed = result.info["requests_per_replica"]
    assert sum(routed) == 8 and min(routed) >= 2, routed       # the probes bypass the router

    for engine, device in zip(engines, devices, strict=True):
        assert engine.runner.cache.k[0].devices() == {device}
        assert engine.runner.token_buffer.devices() == {device}
        served = engine.metrics.render().decode()
        steps = [float(line.split()[-1]) for line in served.splitlines()
                 if line.startswith("arctic_engine_steps_total")]
        assert steps and steps[0] > 4  # both replicas took part of the load


@pytest.mark.parametrize("argv,match", [
    (["--url", "http://x", "--random-weights", "tiny"], "cannot be combined"),
    (["--url", "http://x", "--input-len", "4"], "--vocab-size"),
    (["--random-weights", "tiny", "--input-len", "4", "--input-len-range", "2:3"], "not both"),
    (["--url", "http://x", "--dataset", "d.jsonl", "--output-len", "4"], "drop the length flags"),
    (["--random-weights", "tiny", "--data-parallel-size", "0"], "data-parallel size must be >= 1"),
    (["--url", "http://x", "--data-parallel-size", "2", "--vocab-size", "9"], "in-process replicas"),
    (["--random-weights", "tiny", "--data-parallel-size", "2", "-tp", "2", "--input-len", "4"],
     "one-device engines"),
])
def test_cli_rejects_bad_combinations(argv, match):
    with pytest.raises(ValueError, match=match):
        bench_cli(argv)


def test_cli_rejects_exclusive_load_modes():
    with pytest.raises(SystemExit):  # argparse: mutually exclusive
        bench_cli(["--concurrency", "2", "--request-rate", "3"])


def test_cli_data_parallel_replicas(tmp_path):
    out = tmp_path / "dp.json"
    rc = bench_cli(["--random-weights", "tiny", "--data-parallel-size", "2", "--num-requests", "6",
                    "--concurrency", "3", "--input-len", "9", "--output-len", "4",
                    "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "64",
                    "--page-size", "8", "--output-json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["num_completed"] == 6 and report["length_mismatches"] == []
    assert report["meta"]["data_parallel_size"] == 2
    info = report["info"]
    assert info["xla_compiles_during_run"] == 0 and info["replicas"] == 2
    assert sum(info["requests_per_replica"]) == 6 and min(info["requests_per_replica"]) >= 1


def test_bench_modules_import_without_http_or_plot_stack():
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('httpx', 'matplotlib', 'fastapi', 'uvicorn'): sys.modules[m] = None\n"
            "import arctic_jax.bench.cli_commands, arctic_jax.bench.runner\n"
            "import arctic_jax.bench.report, arctic_jax.bench.workload\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_http_cli_against_the_real_server(tmp_path):
    """``bench --url`` against arctic-jax's own server on a tiny random model: exact lengths."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    import socket
    import threading

    from arctic_jax.engine.async_engine import AsyncEngine
    from arctic_jax.serving.app import ServerState, create_app

    engine, name = runner.build_random_engine(
        "tiny", dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=8))
    runner.warmup_engine(engine, progress=False)
    async_engine = AsyncEngine(engine)
    async_engine.start()
    state = ServerState()
    state.set_ready(async_engine, engine.tokenizer, name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        out = tmp_path / "http.json"
        rc = bench_cli(["--url", f"http://127.0.0.1:{port}", "--vocab-size", "101",
                        "--num-requests", "6", "--request-rate", "100", "--input-len-range", "3:20",
                        "--output-len-range", "2:9", "--output-json", str(out)])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        async_engine.shutdown()
    report = json.loads(out.read_text())
    assert rc == 0 and report["num_completed"] == 6
    assert report["meta"]["model"] == name
    for r in report["requests"]:
        assert r["output_tokens"] == r["max_tokens"] and r["finish_reason"] == "length"
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
    assert report["length_mismatches"] == []
    assert report["total_input_tokens"] == sum(r["prompt_tokens"] for r in report["requests"])
