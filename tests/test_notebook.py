"""The example notebooks execute top to bottom (their cells assert on their results)."""

from notebooks import run_notebook


def test_quickstart_notebook_runs():
    assert "Paris" in run_notebook("quickstart.ipynb")


def test_speculative_decoding_notebook_runs():
    """Greedy output with n-gram speculation equals output without it, on both prompts (the
    notebook asserts it; the marker is printed only after every assertion passed)."""
    outputs = run_notebook("speculative_decoding.ipynb")
    assert "speculative decoding: greedy outputs identical" in outputs
    assert outputs.count("identical with and without speculation") == 2


def test_embeddings_notebook_runs():
    """Embeds passages with the embedded all-MiniLM-L6-v2, searches them, and checks the vectors
    against sentence-transformers and each text alone, then with FP8 matmuls (asserted in the
    notebook)."""
    outputs = run_notebook("embeddings.ipynb")
    assert "embeddings notebook: packed batch equals sentence-transformers and each text alone" in outputs
    assert "embeddings notebook: fp8 vectors find the same passage" in outputs
