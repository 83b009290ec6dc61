"""The book, built and opened in a real browser.

* Every model card's ``bibkey`` has an entry in book/references.bib (instant).
* The book builds without a single Sphinx warning (missing references, unknown citations, ...).
  It is built once per session from the chapters tests/test_notebooks.py executed (papermill,
  quick mode; tests/book_check.py shares them between pytest-xdist workers), with
  ``execute_notebooks: off`` in a copy of book/: the HTML is that of ``make book`` without
  running every chapter a second time.
* Every built HTML page is opened in headless Chromium, screenshotted (into
  ``book/_build/browser-check/``, or ``$AZOO_BOOK_SCREENSHOTS``) and its rendered DOM checked:
  no traceback or error output, no exception on stderr, no widget leaking as text, every figure
  the chapter's notebook made is on the page, every relative link and anchor resolves, and each
  chapter states its mode, device and run time.

Without Chromium the browser test is skipped with the reason (``.ci/run`` installs it).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

for _module in ("yaml", "jupytext", "papermill", "nbformat"):  # the `book` extra
    pytest.importorskip(_module, reason="the book tests need the `book` extra: pip install -e '.[book]'")

import book_check as bc  # noqa: E402
from book_check import shared_run_dir  # noqa: E402,F401  (a session fixture shared with test_notebooks.py)

SCREENSHOTS = Path(os.environ.get("AZOO_BOOK_SCREENSHOTS", bc.BOOK / "_build" / "browser-check"))


def test_every_bibkey_has_an_entry():
    import anomaly_zoo as az

    keys = set(re.findall(r"^@\w+\s*\{\s*([^,\s]+)\s*,", (bc.BOOK / "references.bib").read_text(), re.M))
    cards = az.list_models()
    missing = sorted({f"{c.name}: {c.bibkey}" for c in cards if c.bibkey not in keys})
    assert not missing, f"model cards whose bibkey has no entry in book/references.bib: {missing}"


def test_toc_and_config():
    entries = bc.toc_files()
    for entry in entries:
        assert bc._resolve(entry), f"book/_toc.yml lists {entry!r}, which does not exist"
    assert not any(Path(e).name.startswith("_") for e in entries), "the template must stay out of the toc"
    import yaml

    config = yaml.safe_load((bc.BOOK / "_config.yml").read_text())
    assert config["only_build_toc_files"] is True
    assert config["execute"]["execute_notebooks"] in ("force", "cache", "auto")
    assert (bc.BOOK / "notebooks").resolve() == bc.NOTEBOOKS.resolve(), "book/notebooks must link to ../notebooks"


@dataclass
class Built:
    html: Path
    warnings: list[str]
    log: str
    executions: dict[str, bc.Execution]


@pytest.fixture(scope="session")
def built_book(shared_run_dir, tmp_path_factory):  # noqa: F811
    chapters = bc.chapters()
    # reversed: under pytest-xdist, test_notebooks.py walks the chapters forwards on the other
    # worker, so the two meet in the middle instead of queueing behind each other's locks
    order = list(reversed(chapters))
    workers = 1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(len(order), (os.cpu_count() or 2) // 2))
    with ThreadPoolExecutor(workers) as pool:
        executions = dict(zip([c.stem for c in order], pool.map(lambda c: bc.executed(c, shared_run_dir), order)))
    missing = [k for k, r in executions.items() if not r.output.exists()]
    if missing:
        pytest.fail(f"chapters produced no executed notebook (see test_notebooks.py): {missing}", pytrace=False)
    work = tmp_path_factory.mktemp("book-build")
    src = bc.prepare_book(work / "book", {k: r.output for k, r in executions.items()})
    env = bc.kernel_env(work / "jupyter")
    html, warnings, log = bc.build_book(src, work / "out", env=env)
    return Built(html, warnings, log, executions)


@pytest.mark.slow
def test_book_builds_without_warnings(built_book):
    failed = [k for k, r in built_book.executions.items() if not r.ok]
    assert not failed, f"chapters failed to execute (see test_notebooks.py): {failed}"
    assert not built_book.warnings, "jupyter-book build warnings:\n" + "\n".join(built_book.warnings[:40])


@pytest.mark.slow
def test_pages_in_browser(built_book):
    chrome = bc.find_chromium()
    if chrome is None:
        pytest.skip("no Chromium/Chrome found (install Debian's `chromium`, or set AZOO_CHROMIUM): "
                    "the browser check of the built book was NOT run")
    html_dir = built_book.html
    pages = bc.html_pages(html_dir)
    expected = {Path(e).with_suffix("").as_posix() + ".html" for e in bc.toc_files()}
    built = {p.relative_to(html_dir).as_posix() for p in pages}
    assert expected <= built, f"pages missing from the build: {sorted(expected - built)}"
    chapter_of = {Path(c.entry).with_suffix("").as_posix() + ".html": c for c in bc.chapters()}

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()

    @cache
    def ids_of(path: Path) -> frozenset:
        return frozenset(bc.ids_in_file(path))

    def visit(page: Path) -> dict:
        rel = page.relative_to(html_dir).as_posix()
        shot = SCREENSHOTS / (rel.replace("/", "__").removesuffix(".html") + ".png")
        with tempfile.TemporaryDirectory(prefix="azoo-chromium-") as profile:
            cap = bc.chromium(chrome, page.as_uri(), Path(profile), f"--screenshot={shot}")
        with tempfile.TemporaryDirectory(prefix="azoo-chromium-") as profile:
            dom = bc.chromium(chrome, page.as_uri(), Path(profile), "--dump-dom")
        problems = []
        if dom.returncode != 0 or "<body" not in dom.stdout:
            problems.append(f"chromium could not render the page (exit {dom.returncode}): {dom.stderr[-500:]}")
            return {"page": rel, "problems": problems}
        report = bc.PageReport.from_dom(page, dom.stdout)
        problems += report.problems
        shown = bc.redirect_target(page) or page  # the browser follows a redirect page to its target
        if not shown.exists():
            problems.append(f"redirects to a missing page {shown}")
        problems += [f"broken link {b}" for b in bc.broken_links(shown, report.links, html_dir, ids_of)]
        if cap.returncode != 0 or not shot.exists():
            problems.append(f"no screenshot (exit {cap.returncode}): {cap.stderr[-300:]}")
        else:
            problems += _blank(shot)
        info = {"page": rel, "screenshot": str(shot), "output_images": report.output_images}
        chapter = chapter_of.get(rel)
        if chapter is not None:
            run = built_book.executions[chapter.stem]
            want = bc.notebook_images(run.output)
            info.update(notebook_images=want, seconds=round(run.seconds, 1))
            if report.output_images != want:
                problems.append(f"the notebook made {want} figure(s) but the page shows {report.output_images}")
            if "This page ran in" not in report.text:
                problems.append("the page does not say in which mode/device/time it ran (az.notebook.footer())")
        info["problems"] = problems
        return info

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(visit, pages))
    (SCREENSHOTS / "report.json").write_text(json.dumps(results, indent=1))
    bad = [f"{r['page']}:\n  " + "\n  ".join(r["problems"]) for r in results if r["problems"]]
    assert not bad, f"{len(bad)} page(s) with problems (screenshots in {SCREENSHOTS}):\n" + "\n".join(bad)


def _blank(png: Path) -> list[str]:
    """A screenshot that is one flat colour means the page did not render."""
    try:
        from PIL import Image, ImageStat
    except ImportError:  # pragma: no cover - pillow is a dependency of the library
        return []
    with Image.open(png) as im:
        stat = ImageStat.Stat(im.convert("L"))
    return [f"the screenshot {png.name} is blank"] if stat.stddev[0] < 2.0 else []
