"""The example notebooks that train a model first (a speculator, a SwiftKV student) execute top to
bottom; a module of their own, so that the test workers share the notebooks' time."""

from notebooks import run_notebook


def test_draft_model_speculation_notebook_runs():
    """Trains a tiny speculator, then greedy output with it (alone and with suffix decoding) equals
    the output without it (the notebook asserts; the lines print only after the assertions)."""
    outputs = run_notebook("draft_model_speculation.ipynb")
    assert "arctic: identical output" in outputs and "arctic + suffix: identical output" in outputs


def test_swiftkv_notebook_runs():
    """Distils a quick AcrossKV SwiftKV student of SmolLM2 and serves it beside the teacher (the
    notebook asserts the cache layers and that both answer; the line prints after the asserts)."""
    assert "swiftkv notebook: student served with a 20-layer cache" in run_notebook("swiftkv.ipynb")
