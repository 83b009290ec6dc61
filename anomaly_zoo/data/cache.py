"""Writing generated sets to disk once, and trusting them afterwards only if they check out.

A generated category folder holds the images in the MVTec AD layout plus a
``manifest.json``: the generator's name, version and parameters, and the sha256 of
every file. A later ``load`` reuses the folder when the manifest matches what it would
generate now and every file is present with its recorded hash; otherwise it rebuilds
(with a warning when something was there before: a corrupt file, a missing file,
changed parameters).

Concurrency (pytest-xdist workers, several notebooks starting at once): a set is
generated into a hidden temporary sibling folder, its manifest written last, then
renamed into place, so no reader can ever see half a set. A lock file (``filelock``,
which works on every platform) also serialises the processes that check, build and
read one set, so a set is never rebuilt while another process reads it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from ..utils import AnomalyZooError
from .core import DISEASED, GOOD, Sample

MANIFEST = "manifest.json"
FORMAT = 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold the lock of one set while checking, building or reading it (no lock in a read-only folder)."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path))
        lock.acquire()
    except OSError:  # a read-only data folder: reading needs no lock, writing will fail clearly
        yield
        return
    try:
        yield
    finally:
        lock.release()


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _describe_change(old: dict, new: dict) -> str:
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(diffs[:4]) + (", ..." if len(diffs) > 4 else "")


def check(folder: Path, expected: dict) -> str | None:
    """Why ``folder`` cannot be reused as the set ``expected`` describes, or ``None`` if it can.

    ``expected`` holds ``generator``, ``version`` and ``params``. Returns ``"absent"``
    when there is no folder at all (a first build, not worth a warning).
    """
    if not folder.exists():
        return "absent"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{MANIFEST} is missing or unreadable"
    for key in ("generator", "version"):
        if manifest.get(key) != expected[key]:
            return f"it was made by {key} {manifest.get(key)!r}, now {expected[key]!r}"
    if manifest.get("params") != expected["params"]:
        return f"the generator parameters changed ({_describe_change(manifest.get('params') or {}, expected['params'])})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files"
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            return f"file {rel} is missing"
        if sha256(path) != digest:
            return f"file {rel} does not match its recorded sha256 (corrupt or edited)"
    on_disk = {
        p.relative_to(folder).as_posix()
        for sub in ("train", "test", "ground_truth", "weak")
        if (folder / sub).is_dir()
        for p in (folder / sub).rglob("*")
        if p.is_file()
    }
    extra = sorted(on_disk - set(files))
    if extra:
        return f"unexpected file {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    return None


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def write_set(folder: Path, samples: Iterable[Sample], expected: dict) -> dict:
    """Write ``samples`` into ``folder`` (which must not exist) in the MVTec layout + manifest."""
    counters: dict[tuple[str, str], int] = defaultdict(int)
    files: dict[str, str] = {}
    counts: dict[str, int] = defaultdict(int)
    for s in samples:
        if (s.split not in ("train", "test", "weak") or (s.split == "train" and s.defect != GOOD)
                or (s.split == "weak" and (s.defect not in (GOOD, DISEASED) or s.mask is not None))):
            raise AssertionError(f"generator produced a bad sample: split={s.split!r} defect={s.defect!r}")
        idx = counters[(s.split, s.defect)]
        counters[(s.split, s.defect)] += 1
        rel_img = f"{s.split}/{s.defect}/{idx:03d}.png"
        todo = [(rel_img, s.image)]
        if s.mask is not None and s.defect != GOOD:
            todo.append((f"ground_truth/{s.defect}/{idx:03d}_mask.png", (np.asarray(s.mask) > 0).astype(np.uint8) * 255))
        for rel, arr in todo:
            data = _png_bytes(np.ascontiguousarray(arr))
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[rel] = hashlib.sha256(data).hexdigest()
        counts[f"{s.split}/{s.defect}"] += 1
    manifest = {
        "format": FORMAT,
        **expected,
        "counts": dict(sorted(counts.items())),
        "files": dict(sorted(files.items())),
    }
    tmp = folder / (MANIFEST + ".part")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def _clean_leftovers(folder: Path, min_age_s: float = 3600.0) -> None:
    """Remove temporary folders of builds that crashed (called under the exclusive lock).

    Only folders older than an hour: on file systems where locks are not shared between
    machines (some NFS setups) a young one may still be in use.
    """
    now = time.time()
    for p in folder.parent.glob(f".{folder.name}.*-*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and now - p.stat().st_mtime > min_age_s:
                shutil.rmtree(p, ignore_errors=True)


def build(folder: Path, samples: Callable[[], Iterable[Sample]], expected: dict) -> None:
    """Generate into a temporary sibling folder, then swap it in with atomic renames."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(folder)  # safe: builders hold the set's lock
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = folder.parent / f".{folder.name}.tmp-{tag}"
    old = folder.parent / f".{folder.name}.old-{tag}"
    try:
        tmp.mkdir()
        write_set(tmp, samples(), expected)
        if folder.exists():
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Without a lock another process may have won the race: keep its set if it is good.
            if check(folder, expected) is not None:
                raise
    except OSError as err:
        raise AnomalyZooError(f"cannot write the dataset to {folder}: {err} (set root= or $AZOO_DATA to a writable folder)") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def ensure(folder: Path, samples: Callable[[], Iterable[Sample]], expected: dict, *, force: bool = False,
           then: Callable[[Path], object] | None = None):
    """Make sure ``folder`` holds the set ``expected`` describes; build it if not.

    ``then(folder)`` (e.g. reading the images) runs while the set is locked against a
    concurrent rebuild; its result is returned (``folder`` when ``then`` is None).
    """
    then = then or (lambda f: f)
    lock = lock_path(folder)
    with locked(lock):
        reason = "a rebuild was asked for (force=True)" if force else check(folder, expected)
        if reason is not None:
            if reason != "absent" and not force:
                warnings.warn(f"rebuilding the dataset in {folder}: {reason}", stacklevel=4)
            build(folder, samples, expected)
        return then(folder)
