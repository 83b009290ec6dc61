"""Every chapter of book/_toc.yml runs top to bottom in quick mode, without a cell error.

Each chapter is one test (pytest-xdist runs them in parallel): ``jupytext --to ipynb`` then
``papermill -p QUICK True`` on the ``python3`` kernel of this interpreter (tests/book_check.py).
The executed notebooks are kept in the session's shared temp folder, where tests/test_book.py
builds the HTML from them, so a chapter is executed once per test session.

A second, instant test per chapter checks the conventions every chapter follows (one
``parameters`` cell with QUICK/SEED/DEVICE/DATA_DIR, ``az.notebook.setup`` and ``footer``, no
``matplotlib.use``).
"""
from __future__ import annotations

import ast
import json

import pytest

for _module in ("yaml", "jupytext", "papermill", "nbformat"):  # the `book` extra
    pytest.importorskip(_module, reason="the book tests need the `book` extra: pip install -e '.[book]'")

import book_check as bc  # noqa: E402
from book_check import shared_run_dir  # noqa: E402,F401  (a session fixture shared with test_book.py)

CHAPTERS = bc.chapters()


def test_toc_lists_chapters():
    assert CHAPTERS, "book/_toc.yml lists no notebook chapters"
    assert not any(c.stem.startswith("_") for c in CHAPTERS), "the chapter template must not be in the toc"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=str)
def test_chapter_conventions(chapter):
    import jupytext

    nb = jupytext.read(chapter.path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{chapter.stem}: needs exactly one cell tagged 'parameters', found {len(params)}"
    assigned = {t.id for node in ast.parse(params[0].source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    missing = bc.PARAMETERS - assigned
    assert not missing, f"{chapter.stem}: the parameters cell does not set {sorted(missing)}"
    assert "QUICK = None" in params[0].source, f"{chapter.stem}: QUICK must default to None (see az.notebook.setup)"
    source = "\n".join(c.source for c in code)
    assert "matplotlib.use(" not in source, f"{chapter.stem}: never select a matplotlib backend in a chapter"
    assert "az.notebook.setup(" in source, f"{chapter.stem}: call az.notebook.setup(QUICK, SEED, DEVICE, DATA_DIR)"
    assert code[-1].source.strip() == "az.notebook.footer()", f"{chapter.stem}: end with az.notebook.footer()"
    assert "from tqdm import" not in source and "import tqdm\n" not in source, \
        f"{chapter.stem}: progress bars come from tqdm.auto"


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS, ids=str)
def test_chapter_runs(chapter, shared_run_dir):  # noqa: F811
    result = bc.executed(chapter, shared_run_dir)
    if not result.ok:
        errors = _errors(result.output)
        pytest.fail(f"{chapter.stem} failed under papermill (QUICK=True) after {result.seconds:.0f} s:\n"
                    + ("\n".join(errors) if errors else result.log[-3000:]), pytrace=False)
    print(f"{chapter.stem}: {result.seconds:.1f} s, {bc.notebook_images(result.output)} figure(s)")


def _errors(ipynb) -> list[str]:
    try:
        nb = json.loads(ipynb.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    out = []
    for i, cell in enumerate(nb.get("cells", [])):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                src = "".join(cell.get("source", ""))[:300]
                out.append(f"cell {i}:\n{src}\n-> {o.get('ename')}: {o.get('evalue')}")
    return out
