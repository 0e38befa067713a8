"""Running an example notebook top to bottom in a fresh kernel (the test_notebook*.py modules)."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str) -> str:
    """Execute ``examples/<name>`` in a fresh kernel; returns its printed output."""
    path = os.path.join(ROOT, "examples", name)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}})
    client.execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
