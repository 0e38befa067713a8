"""The example notebooks execute top to bottom (their cells assert on their results)."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_notebook(name: str) -> str:
    """Execute ``examples/<name>`` in a fresh kernel; returns its printed output."""
    path = os.path.join(ROOT, "examples", name)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}})
    client.execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


def test_quickstart_notebook_runs():
    assert "Paris" in _run_notebook("quickstart.ipynb")


def test_speculative_decoding_notebook_runs():
    """Greedy output with n-gram speculation equals output without it, on both prompts (the
    notebook asserts it; the marker is printed only after every assertion passed)."""
    outputs = _run_notebook("speculative_decoding.ipynb")
    assert "speculative decoding: greedy outputs identical" in outputs
    assert outputs.count("identical with and without speculation") == 2


def test_draft_model_speculation_notebook_runs():
    """Trains a tiny speculator, then greedy output with it (alone and with suffix decoding) equals
    the output without it (the notebook asserts; the lines print only after the assertions)."""
    outputs = _run_notebook("draft_model_speculation.ipynb")
    assert "arctic: identical output" in outputs and "arctic + suffix: identical output" in outputs


def test_swiftkv_notebook_runs():
    """Distils a quick AcrossKV SwiftKV student of SmolLM2 and serves it beside the teacher (the
    notebook asserts the cache layers and that both answer; the line prints after the asserts)."""
    assert "swiftkv notebook: student served with a 20-layer cache" in _run_notebook("swiftkv.ipynb")


def test_embeddings_notebook_runs():
    """Embeds passages with the embedded all-MiniLM-L6-v2, searches them, and checks the vectors
    against sentence-transformers and each text alone (asserted in the notebook)."""
    assert ("embeddings notebook: packed batch equals sentence-transformers and each text alone"
            in _run_notebook("embeddings.ipynb"))
