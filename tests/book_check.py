"""Helpers for tests/test_notebooks.py and tests/test_book.py (not a test module itself).

* ``chapters()``: the notebooks listed in ``book/_toc.yml``, in book order.
* ``execute(chapter, out_dir)``: ``jupytext --to ipynb`` + ``papermill -p QUICK True`` on the
  ``python3`` kernel of *this* interpreter (a kernelspec written to a private ``JUPYTER_PATH``
  entry, so a user-level ``python3`` kernel elsewhere cannot be picked up instead).
* ``executed(chapter, shared_dir)``: the same, run at most once per pytest session even across
  pytest-xdist workers (a file lock per chapter in a folder all workers share). test_notebooks
  validates a chapter and test_book builds the HTML from that very executed notebook, so no
  chapter is executed twice.
* ``build_book(...)``: ``jupyter-book build`` of a copy of ``book/`` whose chapters are the executed
  notebooks (execution off), with Sphinx warnings as errors.
* ``PageReport``: what the browser check reads from a page's rendered DOM.
"""
from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = ROOT / "notebooks"
PARAMETERS = {"QUICK", "SEED", "DEVICE", "DATA_DIR"}
# cells tagged like this render no output in the book
HIDDEN_OUTPUT_TAGS = {"remove-output", "remove-cell", "remove_output", "remove_cell"}


# ------------------------------------------------------------------------------------------- the toc
def toc_files() -> list[str]:
    """Every ``file:`` entry of book/_toc.yml (root first), in book order, as written there."""
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    out = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                out.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk({k: v for k, v in toc.items() if k != "root"})
    return out


def _resolve(entry: str) -> Path | None:
    base = BOOK / entry
    if base.suffix in (".md", ".ipynb") and base.exists():
        return base
    for suffix in (".md", ".ipynb"):
        if base.with_name(base.name + suffix).exists():
            return base.with_name(base.name + suffix)
    return None


def is_notebook(path: Path) -> bool:
    """An .ipynb file, or a MyST markdown file with a jupytext header and a kernelspec."""
    if path.suffix == ".ipynb":
        return True
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return False
    header = text.split("---", 2)[1]
    return "jupytext" in header and "kernelspec" in header


@dataclass(frozen=True)
class Chapter:
    entry: str  # as in _toc.yml, e.g. "notebooks/01_problem_data_metrics"
    path: Path  # the source file (through the book/notebooks symlink, resolved)

    @property
    def stem(self) -> str:
        return self.path.stem

    def __str__(self) -> str:  # the pytest id
        return self.stem


def chapters() -> list[Chapter]:
    """The notebook chapters of the toc (markdown pages without a kernel are skipped)."""
    found = []
    for entry in toc_files():
        path = _resolve(entry)
        if path is None:
            raise FileNotFoundError(f"book/_toc.yml lists {entry!r} but no such .md/.ipynb file exists under book/")
        if is_notebook(path):
            found.append(Chapter(entry, path.resolve()))
    return found


# ------------------------------------------------------------------------------------------ kernels
def kernel_env(jupyter_dir: Path, quick: bool = True, threads: int | None = None) -> dict[str, str]:
    """Environment for kernels: quick mode, this interpreter's python3 kernel, inline figures."""
    kdir = jupyter_dir / "kernels" / "python3"
    kdir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python", "metadata": {"debugger": True}}
    (kdir / "kernel.json").write_text(json.dumps(spec, indent=1))
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # tests set Agg; a chapter must get the inline backend or it has no figures
    env["AZOO_QUICK"] = "1" if quick else "0"
    env["JUPYTER_PATH"] = os.pathsep.join([str(jupyter_dir), *filter(None, [os.environ.get("JUPYTER_PATH")])])
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # silences a debugger warning on stderr
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["AZOO_NO_PROGRESS"] = "1"  # a progress bar frozen at its first frame is noise on a built page
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if threads is None and workers > 1:  # one thread per kernel when pytest-xdist already runs one process per core
        threads = 1
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Execution:
    chapter: str
    ok: bool
    seconds: float
    output: Path
    log: str = ""

    def to_json(self) -> dict:
        return {"chapter": self.chapter, "ok": self.ok, "seconds": self.seconds, "output": str(self.output),
                "log": self.log}

    @classmethod
    def from_json(cls, d: dict) -> Execution:
        return cls(d["chapter"], d["ok"], d["seconds"], Path(d["output"]), d.get("log", ""))


def execute(chapter: Chapter, out_dir: Path, timeout: int = 600, quick: bool = True,
            threads: int | None = None) -> Execution:
    """jupytext --to ipynb, then papermill -p QUICK True (False: full mode) on this interpreter's python3 kernel."""
    import jupytext
    import nbformat

    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f"{chapter.stem}.source.ipynb"
    out = out_dir / f"{chapter.stem}.ipynb"
    nb = jupytext.read(chapter.path)
    nbformat.write(nb, src)
    cmd = [sys.executable, "-m", "papermill", str(src), str(out), "-p", "QUICK", str(quick), "-k", "python3",
           "--cwd", str(chapter.path.parent), "--no-progress-bar", "--execution-timeout", str(timeout)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=kernel_env(out_dir / "jupyter", quick, threads), capture_output=True, text=True,
                          timeout=timeout + 120)
    seconds = time.perf_counter() - t0
    log = (proc.stdout + proc.stderr)[-6000:]
    return Execution(chapter.stem, proc.returncode == 0 and out.exists(), seconds, out, log)


@contextmanager
def _locked(path: Path):
    """An exclusive lock between processes (pytest-xdist workers); a no-op where fcntl is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: xdist workers may then execute a chapter twice, which is only slower
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def executed(chapter: Chapter, shared: Path) -> Execution:
    """Execute ``chapter`` once per session (whichever xdist worker asks first); later calls reuse it."""
    record = shared / f"{chapter.stem}.json"
    with _locked(shared / f"{chapter.stem}.lock"):
        if record.exists():
            return Execution.from_json(json.loads(record.read_text()))
        result = execute(chapter, shared)
        record.write_text(json.dumps(result.to_json()))
        return result


# ---------------------------------------------------------------------------------- notebook facts
def notebook_images(ipynb: Path) -> int:
    """Image outputs the book will show: image/* outputs of cells not tagged to hide their output."""
    nb = json.loads(ipynb.read_text(encoding="utf-8"))
    n = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        tags = set(cell.get("metadata", {}).get("tags", []))
        if tags & HIDDEN_OUTPUT_TAGS:
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if any(mime.startswith("image/") for mime in data):
                n += 1
    return n


# ------------------------------------------------------------------------------------- the build
def prepare_book(dest: Path, executed_chapters: dict[str, Path]) -> Path:
    """A copy of book/ whose chapters are the executed notebooks and whose config does not execute."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(BOOK, dest, symlinks=False, ignore=shutil.ignore_patterns("_build", "notebooks"))
    nb_dir = dest / "notebooks"
    shutil.copytree(NOTEBOOKS, nb_dir, ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints", "__pycache__"))
    for chapter in chapters():
        if chapter.stem not in executed_chapters:
            raise KeyError(f"no executed notebook for chapter {chapter.stem}")
        rel = Path(chapter.entry)
        target_dir = dest / rel.parent
        target_dir.mkdir(parents=True, exist_ok=True)
        (target_dir / chapter.path.name).unlink(missing_ok=True)
        nb = json.loads(executed_chapters[chapter.stem].read_text(encoding="utf-8"))
        for cell in nb["cells"]:  # papermill's injected cell: not shown, as in `make book`
            if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
                cell["metadata"]["tags"] = sorted(set(cell["metadata"]["tags"]) | {"remove-cell"})
        (target_dir / f"{chapter.stem}.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    config["exclude_patterns"] = [p for p in config.get("exclude_patterns", []) if not p.endswith(".ipynb")]
    (dest / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def jupyter_book_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    return [sys.executable, "-m", "jupyter_book.cli.main"]


WARNING = re.compile(r"(WARNING|ERROR|CRITICAL)[:\]]")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def build_book(src: Path, out: Path, env: dict[str, str] | None = None, timeout: int = 900) -> tuple[Path, list[str], str]:
    """``jupyter-book build --all``; returns (html folder, warning lines, log tail)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = jupyter_book_cmd() + ["build", str(src), "--path-output", str(out), "--all", "--keep-going"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    log = ANSI.sub("", proc.stdout + proc.stderr)
    warnings = [line for line in log.splitlines() if WARNING.search(line)]
    html_dir = out / "_build" / "html"
    if proc.returncode != 0 or not (html_dir / "index.html").exists():
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}):\n{log[-5000:]}")
    return html_dir, warnings, log[-5000:]


def redirect_target(page: Path) -> Path | None:
    """The page a ``<meta http-equiv="refresh">`` page sends the browser to (Jupyter Book's index.html)."""
    m = re.search(r'<meta[^>]+http-equiv="refresh"[^>]+content="[^"]*url=([^"]+)"', page.read_text(errors="replace"), re.I)
    return (page.parent / unquote(urlsplit(m.group(1)).path)).resolve() if m else None


def html_pages(html_dir: Path) -> list[Path]:
    skip = {"_static", "_sources", "_images", "_sphinx_design_static", "_panels_static"}
    return sorted(p for p in html_dir.rglob("*.html") if not (set(p.relative_to(html_dir).parts) & skip))


# ------------------------------------------------------------------------------------ the browser
def find_chromium() -> str | None:
    for name in (os.environ.get("AZOO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def chromium(binary: str, url: str, profile: Path, *extra: str, timeout: int = 90) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}", "--window-size=1280,2000",
           "--virtual-time-budget=4000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class _DomParser(html.parser.HTMLParser):
    """Collects what the checks need from a rendered page, in one pass."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, set[str]]] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.output_images = 0
        self.error_outputs: list[str] = []  # text of traceback / error-class outputs
        self.stderr_texts: list[str] = []
        self.output_texts: list[str] = []
        self._capture: list[list] = []  # [kind, depth, parts]

    def _classes(self) -> set[str]:
        out = set()
        for _, c in self.stack:
            out |= c
        return out

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if a.get("id"):
            self.ids.add(a["id"])
        if a.get("name") and tag == "a":
            self.ids.add(a["name"])
        for key in ("href", "src"):
            if a.get(key) and tag in ("a", "img", "link", "script", "iframe", "source"):
                self.links.append(a[key])
        if tag == "img" and any("cell_output" in c for c in self._classes() | classes):
            self.output_images += 1
        if tag in self.VOID:
            return
        self.stack.append((tag, classes))
        kind = None
        if classes & {"traceback", "ipythontb", "system-message"} or ("output" in classes and "error" in classes):
            kind = "error"
        elif "stderr" in classes:
            kind = "stderr"
        elif "output" in classes or "cell_output" in classes:
            kind = "output"
        if kind:
            self._capture.append([kind, len(self.stack), []])

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        while self._capture and self._capture[-1][1] > len(self.stack):
            kind, _, parts = self._capture.pop()
            text = "".join(parts)
            {"error": self.error_outputs, "stderr": self.stderr_texts, "output": self.output_texts}[kind].append(text)

    def handle_data(self, data):
        for cap in self._capture:
            cap[2].append(data)


@dataclass
class PageReport:
    page: Path
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    output_images: int = 0
    problems: list[str] = field(default_factory=list)
    text: str = ""

    @classmethod
    def from_dom(cls, page: Path, dom: str) -> PageReport:
        p = _DomParser()
        p.feed(dom)
        p.close()
        rep = cls(page, p.links, p.ids, p.output_images)
        rep.text = re.sub(r"<[^>]+>", " ", dom)
        for t in p.error_outputs:
            rep.problems.append(f"error output: {t.strip()[:300]!r}")
        for t in p.stderr_texts:
            if re.search(r"Traceback|Error\b|Exception\b", t):
                rep.problems.append(f"stderr with an exception: {t.strip()[:300]!r}")
        for t in p.output_texts:
            if "Traceback (most recent call last)" in t:
                rep.problems.append(f"traceback in an output: {t.strip()[:300]!r}")
            if re.search(r"\b(interactive|HBox|VBox|FloatSlider)\(children=", t):
                rep.problems.append(f"a widget leaked into the page as text: {t.strip()[:120]!r}")
        return rep


def broken_links(page: Path, links: list[str], html_dir: Path, ids_of) -> list[str]:
    """Relative links of ``page`` that do not resolve to a file (or to an id in that file)."""
    bad = []
    for link in links:
        parts = urlsplit(link)
        if parts.scheme or parts.netloc or link.startswith(("//", "data:", "mailto:", "javascript:")):
            continue
        target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
        if parts.path.endswith("/"):
            target = target / "index.html"
        if not target.exists():
            bad.append(f"{link} -> missing file {target}")
            continue
        try:
            target.relative_to(html_dir.resolve())
        except ValueError:
            bad.append(f"{link} -> points outside the built site ({target})")
            continue
        frag = unquote(parts.fragment)
        if frag and target.suffix == ".html" and frag not in ids_of(target):
            bad.append(f"{link} -> no id {frag!r} in {target.name}")
    return bad


def ids_in_file(path: Path) -> set[str]:
    p = _DomParser()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    return p.ids


# --------------------------------------------------------------------------------------- fixtures
import pytest  # noqa: E402  (kept at the end: the helpers above do not need pytest)


@pytest.fixture(scope="session")
def shared_run_dir(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (the executed chapters live here)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "book-run"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------- make book
def main(argv=None) -> int:
    """``make book``: execute every chapter, ``--jobs`` at a time, then build the HTML without executing again.

    Executing the chapters one after another (Jupyter Book's own execution) took 412 s for 7 chapters on
    2 cores; in parallel, one thread per kernel, the build stays under 10 minutes with twice the chapters.
    """
    import argparse
    from concurrent.futures import ThreadPoolExecutor

    p = argparse.ArgumentParser(prog="book_check.py", description=main.__doc__)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--full", action="store_true", help="full mode (QUICK=False) instead of quick")
    p.add_argument("--out", default=str(BOOK), help="the build goes to OUT/_build/html")
    args = p.parse_args(argv)
    work = Path(args.out).resolve() / "_build" / ".executed"
    todo = chapters()
    t0 = time.perf_counter()
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda c: execute(c, work, quick=not args.full, threads=threads), todo))
    for r in results:
        print(f"{r.chapter}: {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s")
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            print(f"--- {r.chapter} ---\n{r.log}", file=sys.stderr)
        return 1
    src = prepare_book(work.parent / ".src", {r.chapter: r.output for r in results})
    html_dir, warnings, _ = build_book(src, work.parent / ".site")
    final = Path(args.out).resolve() / "_build" / "html"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(html_dir, final)
    print(f"built {final} in {time.perf_counter() - t0:.0f} s ({len(warnings)} warning line(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
