"""Smoke test of benchmarks/decode_prefill.py: packed prefill cases and the SwiftKV comparison run."""
import pytest

from benchmarks import decode_prefill


def test_parse_prefill_lengths_and_packed_prompts():
    assert decode_prefill.parse_prefill("2048,2048x4,,64") == [(2048, 1), (2048, 4), (64, 1)]
    with pytest.raises(SystemExit, match="expected N or NxP, got '2kx4'"):
        decode_prefill.parse_prefill("2kx4")


def test_swiftkv_table_has_every_case():
    table = decode_prefill.main(["--random", "tiny", "--swiftkv", "1", "--batches", "2", "--contexts", "32",
                                 "--prefill", "24,24x3", "--iters", "2"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| decode batch 2, context 32", "| prefill 24 tokens", "| prefill 24 tokens x 3 prompts"]
    for row in rows:  # base ms, SwiftKV ms, ratio, base tok/s, SwiftKV tok/s: all measured, positive
        values = [float(x.replace(",", "")) for x in row.strip("| ").split(" | ")[1:]]
        assert len(values) == 5 and all(v > 0 for v in values)
    # tokens/s of the packed case counts all three prompts: tokens / (ms / 1000) with 72 tokens
    base_ms, *_, base_tps, _ = [float(x.replace(",", "")) for x in rows[2].strip("| ").split(" | ")[1:]]
    assert base_tps == pytest.approx(72 / (base_ms / 1e3), rel=0.05)
