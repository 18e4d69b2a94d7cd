"""The committed Colab notebook: outputs stripped, the papermill parameters cell, the README's badge.
(It is executed end to end in tests/integration/test_distill_cli.py.)"""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "gmflow_jax.ipynb"


def _cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def test_committed_notebook_is_stripped():
    for cell in _cells():
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])[:80]
    assert NOTEBOOK.stat().st_size < 40_000


def test_parameters_cell():
    (cell,) = [c for c in _cells() if "parameters" in c.get("metadata", {}).get("tags", [])]
    tree = ast.parse("".join(cell["source"]))
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}
    assert values["workdir"] == "" and values["student_workdir"] == "" and values["install"] is True
    assert {"num_per_class", "steps"} <= values.keys()


def test_every_code_cell_is_explained():
    cells = _cells()
    for before, cell in zip(cells, cells[1:], strict=False):
        if cell["cell_type"] == "code":
            assert before["cell_type"] == "markdown", "".join(cell["source"])[:80]


def test_readme_badge_opens_the_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "colab-badge.svg" in readme and "/blob/main/notebooks/gmflow_jax.ipynb" in readme
