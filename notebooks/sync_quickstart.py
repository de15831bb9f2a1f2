"""Writes quickstart.ipynb (nbformat 4) from its twin quickstart.py.

The twin is in the percent format: `# %%` starts a code cell, `# %% [markdown]` a
markdown cell whose lines are comments. Run after editing the twin:

    python notebooks/sync_quickstart.py
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TWIN = os.path.join(HERE, "quickstart.py")
NOTEBOOK = os.path.join(HERE, "quickstart.ipynb")


def cells_of(text: str) -> list[tuple[str, str]]:
    """[(kind, source)] of a percent-format file; kind is "code" or "markdown"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            kind, lines = cells[-1]
            if kind == "markdown":
                line = line[2:] if line.startswith("# ") else line.lstrip("#")
            lines.append(line)
        elif line.strip():
            raise ValueError(f"text before the first '# %%' cell marker: {line!r}")
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def notebook(cells: list[tuple[str, str]]) -> dict:
    out = []
    for i, (kind, source) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {},
                "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        out.append(cell)
    return {"cells": out, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                        "name": "python3"},
                         "language_info": {"name": "python"}}}


def main() -> None:
    with open(TWIN) as f:
        nb = notebook(cells_of(f.read()))
    with open(NOTEBOOK, "w") as f:
        json.dump(nb, f, indent=1)
        f.write("\n")
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
