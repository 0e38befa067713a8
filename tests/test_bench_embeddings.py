"""``arctic-jax bench --embeddings``: workloads (exact token counts for texts and ids), padding
saved against a hand computation, the model-forward and in-process end-to-end runs on a tiny
random encoder (token counts equal the workload's, consistent rates and latencies, RESULTS.md),
the HTTP driver through the openai client against a mock transport and against
``arctic-jax serve``, and clear errors for bad flags."""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest

from arctic_jax.bench import embed_drivers as ed
from arctic_jax.bench import embed_workload as ew
from arctic_jax.bench import workload as wl
from arctic_jax.engine.embedding_scheduler import BatchShape, plan_all

# Small engine limits for the tiny encoder: 2 token buckets x 1 sequence bucket.
ENGINE = ["--max-num-batched-tokens", "256", "--token-buckets", "64,256", "--max-num-seqs", "16",
          "--seq-buckets", "16"]


def fresh_seed() -> int:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {seed}")
    return seed


def bench_cli(argv):
    """Parse and run ``arctic-jax bench ARGV`` (without ``cli.main``'s logging set-up)."""
    from arctic_jax import cli

    args = cli.build_parser().parse_args(["bench", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from arctic_jax.engine.embedding_tokenizer import EmbeddingTokenizer
    from checkpoints.loader import default_embedding_model_path, load_tokenizer
    from checkpoints.sentence_transformers import read_pooling_config

    path = default_embedding_model_path()
    tok = EmbeddingTokenizer(load_tokenizer(path), read_pooling_config(path))
    yield tok
    tok.close()


# ------------------------------------------------------------------ workload
def test_padding_saved_matches_a_hand_computation():
    lengths = [10, 30, 20, 5, 40]
    # Budget 64: [10, 30, 20] (60 tokens) in the 64 bucket; [5, 40] (45 tokens) in the 64 bucket
    # (splitting it, 32 + 64 slots, would pad more).
    plan = plan_all(lengths, (32, 64), (8,), 8)
    assert plan == [BatchShape(3, 60, 64, 8), BatchShape(2, 45, 64, 8)]
    stats = ew.padding_stats(lengths, plan)
    padded = 3 * 30 + 2 * 40            # each batch padded to its longest input
    packed = 64 + 64
    assert (stats.real_tokens, stats.padded_slots, stats.packed_slots) == (105, padded, packed)
    assert stats.saved_percent == pytest.approx(100 * (170 - 128) / 170)
    with pytest.raises(ValueError, match="does not match"):
        ew.padding_stats([10, 30, 21, 5, 40], plan)
    with pytest.raises(ValueError, match="covers 5 of 6"):
        ew.padding_stats(lengths + [3], plan)


def test_token_id_inputs_and_requests():
    seed = fresh_seed()
    inputs = ew.token_id_inputs(101, wl.LengthRange(3, 17), 50, seed)
    lengths = [len(s) for s in inputs]
    assert len(inputs) == 101 and min(lengths) >= 3 and max(lengths) <= 17
    assert len(set(lengths)) > 5                                   # a real range
    ids = np.concatenate([np.array(s) for s in inputs])
    assert ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) > 40
    w = ew.EmbedWorkload(tuple(inputs), tuple(lengths), 8, wl.LengthRange(3, 17), "x")
    reqs = w.requests()
    assert len(reqs) == 13 and reqs[0] == (0, 8) and reqs[-1] == (96, 101)
    assert [i for a, b in reqs for i in range(a, b)] == list(range(101))
    assert w.num_tokens == sum(lengths) and not w.is_text and w.label == "3:17 tokens, token ids"
    with pytest.raises(ValueError, match="batch_size"):
        ew.EmbedWorkload(tuple(inputs), tuple(lengths), 0, wl.LengthRange(3, 17), "x")


def test_texts_have_exact_token_counts(minilm_tokenizer):
    seed = fresh_seed()
    maker = ew.text_maker(minilm_tokenizer)
    assert maker.overhead == 2 and maker.min_length == 3          # [CLS] ... [SEP]
    lengths = [int(n) for n in np.random.default_rng(seed).integers(3, 300, size=40)]
    texts = maker.make(lengths, seed)
    # Independent count: the HF tokenizer itself.
    counted = [len(ids) for ids in minilm_tokenizer.tokenizer(texts)["input_ids"]]
    assert counted == lengths
    assert all(t.replace(" ", "").isalpha() for t in texts)
    multi = [w for w in ew.WORDS if len(minilm_tokenizer.tokenizer.tokenize(w)) > 1]
    assert multi and any(w in t.split() for t in texts for w in multi)  # word pieces occur
    with pytest.raises(ValueError, match="no room"):
        maker.make([2], seed)


# --------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("embed")
    paths = {"json": d / "r.json", "md": d / "RESULTS.md"}
    rc = bench_cli(["--embeddings", "--random-weights", "tiny", "--input-len", "20",
                    "--num-inputs", "40", "--batch-size", "3", "--concurrency", "1,4",
                    "--seed", "5", *ENGINE, "--output-json", str(paths["json"]),
                    "--append-results", str(paths["md"]), "--compare-note", "smoke run"])
    return rc, paths, json.loads(paths["json"].read_text())


def test_fixed_length_counts_rates_and_latencies(fixed_run):
    rc, _, report = fixed_run
    assert rc == 0
    forward, *e2e = report["rows"]
    # 12 inputs of 20 tokens fill the 256 budget (240 tokens); 40 inputs make 3 such batches and
    # a tail of 4, which runs in smaller buckets and is not timed.
    assert forward["mode"] == "model forward"
    assert (forward["inputs"], forward["tokens"], forward["device_batches"],
            forward["token_slots"]) == (36, 720, 3, 768)
    assert [r["concurrency"] for r in e2e] == [1, 4]
    for r in e2e:
        assert r["mode"] == "e2e in-process" and r["failed"] == 0
        assert r["inputs"] == 40 and r["tokens"] == 40 * 20 and r["requests"] == 14
        assert r["token_mismatches"] == [] and r["info"]["xla_compiles_during_run"] == 0
        # Device batches ran exactly the workload's tokens (the warm-up request is outside).
        assert r["info"]["device_batch_tokens"] == 800
        assert r["info"]["device_batch_token_slots"] >= 800
        lat = r["latency_ms"]
        assert lat["count"] == 14 and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
        assert lat["max"] <= 1e3 * r["seconds"] + 1e-6
    for r in report["rows"]:
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["padding_saved_percent"] is None                  # fixed length: no padding
    meta = report["meta"]
    assert meta["model"] == "random-weights:tiny" and meta["pooling"] == "cls + L2 norm"
    assert meta["card"] and meta["jax_version"] and meta["warmup_s"] > 0
    assert meta["input_len"] == 20 and not meta["bert_base_shape"]
    assert meta["command"].startswith("arctic-jax bench --embeddings ")
    assert "--input-len 20" in meta["command"] and "--concurrency 1,4" in meta["command"]


def test_results_section_has_conditions_and_peers(fixed_run):
    _, paths, _ = fixed_run
    md = paths["md"].read_text()
    assert md.startswith("# Benchmark results")
    assert "## Embeddings: random-weights:tiny" in md and "- Note: smoke run" in md
    for text in ("- Card: ", "jax ", "Python ", "- Command: `arctic-jax bench --embeddings",
                 "| model forward | 20 tokens, token ids |", "| e2e in-process |",
                 "transformers BertModel eager", "2.120M", "Arctic Inference", "1.640M",
                 "1.410M", "TEI", "1.620M", "0.610M", "Compute limit", "3.0M"):
        assert text in md, text
    assert "Ratios to peers are left out" in md                    # tiny is not BERT-base


def test_peer_ratios_for_the_bert_base_shape():
    from arctic_jax.bench import embed_report as er

    rng = np.random.default_rng(fresh_seed())
    work = ew.EmbedWorkload(((1,) * 512,) * 4, (512,) * 4, 2, wl.LengthRange(512, 512), "w")
    seconds = float(rng.uniform(0.5, 2.0))
    forward = er.forward_row(ed.ForwardResult(3, 96, 3_000_000, 3_000_000, seconds), work, None)
    records = [ed.EmbedRecord(i, 2, 1024, 1024, arrival=0.1 * i, end=0.1 * i + seconds)
               for i in range(2)]
    run = ed.EmbedRun(records, 0.0, 0.1 + seconds)
    http = er.run_row(er.MODE_HTTP, run, work, concurrency=2, padding=None)
    local = er.run_row(er.MODE_IN_PROCESS, run, work, concurrency=2, padding=None)
    assert http["tokens"] == 2048 and http["latency_ms"]["p50"] == pytest.approx(1e3 * seconds)
    meta = {"card": "NVIDIA H200", "bert_base_shape": True, "input_len": 512}
    md = er.results_section([forward, http, local], meta, title="t")
    rows = [line for line in md.splitlines() if line.startswith("| e2e") or
            line.startswith("| model forward")]
    assert rows[0].endswith(f"| transformers BertModel eager, SDPA, fp16: 2.120M | "
                            f"{3e6 / seconds / 2.12e6:.2f}x |")
    assert rows[1].endswith(f"| Arctic Inference: 1.640M | {2048 / (0.1 + seconds) / 1.64e6:.2f}x |")
    assert rows[2].endswith("| - | - |")                           # in-process: no HTTP peer
    assert "left out" not in md and "ours on NVIDIA H200" in md
    assert er.peer_for(er.MODE_HTTP, 50).tokens_per_s == 1.41e6
    assert er.peer_for(er.MODE_FORWARD, 50).tokens_per_s == 2.11e6
    assert er.peer_for(er.MODE_FORWARD, 300) is None


def test_mixed_lengths_report_padding_saved(tmp_path):
    seed = fresh_seed()
    out = tmp_path / "mixed.json"
    rc = bench_cli(["--embeddings", "--random-weights", "tiny", "--input-len-range", "5:60",
                    "--num-inputs", "60", "--batch-size", "7", "--concurrency", "3",
                    "--seed", str(seed), *ENGINE, "--output-json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0
    lengths = [len(s) for s in ew.token_id_inputs(60, wl.LengthRange(5, 60), 1000, seed)]
    plan = plan_all(lengths, (64, 256), (16,), 16)
    # By hand: each device batch padded to its longest input vs the bucket it packs into.
    padded = packed = start = 0
    full_tokens = full_padded = full_packed = 0
    for b in plan:
        batch = lengths[start:start + b.num_seqs]
        padded += len(batch) * max(batch)
        packed += b.token_bucket
        if b.token_bucket == 256:
            full_tokens += sum(batch)
            full_padded += len(batch) * max(batch)
            full_packed += 256
        start += b.num_seqs
    assert report["padding"] == {"num_batches": len(plan), "real_tokens": sum(lengths),
                                 "padded_slots": padded, "packed_slots": packed}
    forward, e2e = report["rows"]
    assert forward["tokens"] == full_tokens and forward["token_slots"] == full_packed
    assert forward["padding_saved_percent"] == pytest.approx(
        100 * (full_padded - full_packed) / full_padded)
    assert e2e["tokens"] == sum(lengths) and e2e["inputs"] == 60 and e2e["failed"] == 0
    assert e2e["padding_saved_percent"] == pytest.approx(100 * (padded - packed) / padded)
    assert 0 < e2e["padding_saved_percent"] < 100


def test_text_end_to_end_counts_tokenized_tokens(tmp_path):
    """The embedded all-MiniLM-L6-v2 on texts: the tokens embedded are the drawn lengths."""
    out = tmp_path / "text.json"
    rc = bench_cli(["--embeddings", "--model", "all-MiniLM-L6-v2", "--text", "--input-len-range",
                    "8:40", "--num-inputs", "10", "--batch-size", "4", "--concurrency", "2",
                    "--embed-modes", "e2e", "--max-model-len", "64", "--max-num-batched-tokens",
                    "128", "--token-buckets", "128", "--max-num-seqs", "8", "--seq-buckets", "8",
                    "--output-json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0
    (row,) = report["rows"]
    lengths = [int(n) for n in wl.LengthRange(8, 40).draw(np.random.default_rng(0), 10)]
    assert row["mode"] == "e2e in-process" and row["workload_label"] == "8:40 tokens, text"
    assert row["tokens"] == sum(lengths) and row["inputs"] == 10 and row["requests"] == 3
    assert row["failed"] == 0 and row["token_mismatches"] == []
    assert report["meta"]["model"] == "all-MiniLM-L6-v2"


# ---------------------------------------------------------------------- HTTP
def _mock_server(usage_extra: int = 0, fail_from: int | None = None):
    """An httpx handler serving /v1/models and /v1/embeddings (base64 float32 rows)."""
    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "mock-encoder", "object": "model", "created": 0, "owned_by": "me"}]})
        assert request.url.path == "/v1/embeddings"
        body = json.loads(request.content)
        seen.append(body)
        if fail_from is not None and len(seen) > fail_from:
            return httpx.Response(400, json={"error": {"message": "bad input", "type": "x"}})
        rows = np.random.default_rng(len(seen)).standard_normal((len(body["input"]), 8))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(r.astype("<f4").tobytes()).decode()}
                for i, r in enumerate(rows)]
        tokens = sum(len(x) for x in body["input"]) + usage_extra
        return httpx.Response(200, json={"object": "list", "data": data, "model": body["model"],
                                         "usage": {"prompt_tokens": tokens,
                                                   "total_tokens": tokens}})

    return handler, seen


def _workload(n: int, batch: int, seed: int) -> ew.EmbedWorkload:
    inputs = ew.token_id_inputs(n, wl.LengthRange(2, 9), 30, seed)
    return ew.EmbedWorkload(tuple(inputs), tuple(len(s) for s in inputs), batch,
                            wl.LengthRange(2, 9), "mock")


def test_http_driver_uses_base64_and_counts_usage_tokens():
    import httpx

    seed = fresh_seed()
    handler, seen = _mock_server()
    work = _workload(23, 5, seed)
    run = ed.run_http("http://mock", work, concurrency=3, warmup_requests=1,
                      http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    assert run.info["served_model"] == "mock-encoder"
    assert len(seen) == 1 + 5                                       # warm-up + 5 requests
    assert all(b["encoding_format"] == "base64" and b["model"] == "mock-encoder" for b in seen)
    sent = sorted(tuple(map(tuple, b["input"])) for b in seen[1:])
    assert sent == sorted(tuple(work.inputs[a:b]) for a, b in work.requests())
    assert [r.index for r in run.records] == list(range(5))
    assert all(r.ok and r.tokens == r.expected_tokens for r in run.records)
    assert sum(r.tokens for r in run.records) == work.num_tokens
    assert run.start <= min(r.arrival for r in run.records) and run.end >= run.records[-1].end


def test_http_driver_reports_failures_and_token_mismatches():
    import httpx

    from arctic_jax.bench import embed_report as er

    work = _workload(12, 4, fresh_seed())
    handler, _ = _mock_server(usage_extra=1, fail_from=2)          # warm-up, one ok, then 400s
    run = ed.run_http("http://mock", work, concurrency=1, warmup_requests=1,
                      http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    row = er.run_row(er.MODE_HTTP, run, work, concurrency=1, padding=None)
    assert row["failed"] == 2 and row["inputs"] == 4 and row["token_mismatches"] == [0]
    assert "400" in row["errors"][0]
    table = er.format_table([row])
    assert "FAILED (e2e HTTP): 2 of 3 requests" in table and "WARNING (e2e HTTP)" in table


def _server_supports_embeddings() -> bool:
    import importlib.util

    return importlib.util.find_spec("arctic_jax.serving.embeddings") is not None


@pytest.mark.skipif(not _server_supports_embeddings(),
                    reason="arctic-jax serve has no /v1/embeddings yet")
def test_http_bench_against_arctic_jax_serve(tmp_path):
    """``bench --embeddings --url`` against ``arctic-jax serve`` on all-MiniLM-L6-v2: texts and
    token ids, two client processes; tokens from usage equal the workload's."""
    from arctic_jax.serving.cli_commands import ServerProcess
    from helpers import REPO_ROOT, server_env

    args = ["--model", "all-MiniLM-L6-v2", "--max-num-batched-tokens", "256", "--token-buckets",
            "64,256", "--max-num-seqs", "16", "--seq-buckets", "16"]
    with ServerProcess(args, env=server_env(), cwd=REPO_ROOT) as server:
        server.wait_ready(timeout=300)
        for extra in (["--text", "--client-processes", "2", "--concurrency", "4"],
                      ["--concurrency", "2"]):
            out = tmp_path / "http.json"
            rc = bench_cli(["--embeddings", "--url", server.url, "--input-len-range", "4:60",
                            "--num-inputs", "30", "--batch-size", "4", "--seed", "2", *extra,
                            "--output-json", str(out)])
            report = json.loads(out.read_text())
            (row,) = report["rows"]
            assert rc == 0, report
            assert row["mode"] == "e2e HTTP" and row["failed"] == 0 and row["inputs"] == 30
            assert row["token_mismatches"] == [] and row["requests"] == 8
            lengths = wl.LengthRange(4, 60).draw(np.random.default_rng(2), 30)
            assert row["tokens"] == int(lengths.sum())
            assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
            assert row["info"]["client_processes"] == (2 if "--text" in extra else 1)


# ---------------------------------------------------------------- bad flags
@pytest.mark.parametrize("argv,match", [
    (["--embeddings", "--random-weights", "tiny", "--input-len", "200"],
     r"--input-len 200 is above the model's max length 128"),
    (["--embeddings", "--random-weights", "tiny", "--input-len-range", "5:129"],
     r"--input-len-range 5:129 is above the model's max length 128"),
    (["--embeddings", "--random-weights", "tiny", "--input-len", "10", "--num-inputs", "3",
      *ENGINE], "fills no device batch of 256 tokens"),
    (["--embeddings", "--random-weights", "llama-3.1-8b"], "not an encoder shape"),
    (["--embeddings", "--random-weights", "tiny", "--text"], "needs a model with a tokenizer"),
    (["--embeddings", "--output-len", "4"], "--output-len is a flag of the LLM benchmark"),
    (["--embeddings", "--request-rate", "4"], "--request-rate is a flag of the LLM benchmark"),
    (["--embeddings", "--input-len", "4", "--input-len-range", "2:3"], "not both"),
    (["--embeddings", "--input-len", "0"], ">= 1"),
    (["--embeddings", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--embeddings", "--concurrency", "0"], "--concurrency must be >= 1"),
    (["--embeddings", "--embed-modes", "forward,bogus"], "--embed-modes takes"),
    (["--embeddings", "--client-processes", "2"], "needs --url"),
    (["--embeddings", "--url", "http://x", "--random-weights", "tiny"], "cannot be combined"),
    (["--embeddings", "--url", "http://x", "--max-num-seqs", "4"], "on `arctic-jax serve`"),
    (["--embeddings", "--url", "http://x", "--embed-modes", "e2e"], "in-process"),
    (["--embeddings", "--url", "http://x", "--input-len", "300"],
     "--input-len 300 is above the model's max length 256"),
    (["--num-inputs", "5"], "--num-inputs belongs to the embedding benchmark"),
    (["--quantization", "fp8"], "--quantization belongs to the embedding benchmark"),
    (["--embeddings", "--url", "http://x", "--quantization", "fp8"], "on `arctic-jax serve`"),
    (["--random-weights", "bert-base"], "encoder shape: add --embeddings"),
])
def test_bad_flags_fail_clearly(argv, match):
    with pytest.raises(ValueError, match=match):
        bench_cli(argv)


def test_bench_embedding_modules_import_without_jax_or_http_stack():
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('jax', 'openai', 'httpx', 'fastapi'): sys.modules[m] = None\n"
            "import arctic_jax.bench.embeddings, arctic_jax.bench.embed_drivers\n"
            "import arctic_jax.bench.embed_report, arctic_jax.bench.embed_workload\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
