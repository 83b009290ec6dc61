"""Reader for the MVTec AD folder layout, the one reader every dataset goes through.

The layout (Bergmann et al., CVPR 2019)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png   (none for "good")

Users who downloaded MVTec AD (or any set in this layout) read it with
``load("mvtec", root=..., category=...)``. The generated sets (textures, digits,
phantom) are written in the same layout and read back by the same code, so what a
detector sees does not depend on whether the set was just generated or cached.
A set without a ``ground_truth`` folder has image-level labels only (``test_masks=None``).

Sets with lesions (phantom, retina) also hold a weakly labelled split, read into
``ds.weak_images`` and ``ds.weak_labels`` (``None`` without a ``weak`` folder, as in MVTec AD)::

    <root>/<category>/weak/good/000.png       (label 0, healthy)
    <root>/<category>/weak/diseased/000.png   (label 1, no mask)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..utils import AnomalyZooError
from .core import DISEASED, GOOD, AnomalyDataset, data_root

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _open(path: Path) -> Image.Image:
    """Open and decode an image, or raise one clear error naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise AnomalyZooError(f"cannot read image file {path}: {err} (corrupt or not an image?)") from err


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """A PIL image as float32 ``[3, H, W]`` in [0, 1]; grayscale is repeated to 3 channels."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        gray = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(gray[None], 3, axis=0)
    if im.mode in ("I", "F"):
        gray = np.asarray(im, dtype=np.float32)
        top = 65535.0 if gray.max() > 255 else 255.0
        return np.repeat(np.clip(gray / top, 0, 1)[None], 3, axis=0)
    if im.mode == "L":
        gray = np.asarray(im, dtype=np.float32) / 255.0
        return np.repeat(gray[None], 3, axis=0)
    return np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


def _parse_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool) and image_size > 0:
        return int(image_size), int(image_size)
    if (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        return int(image_size[0]), int(image_size[1])
    raise AnomalyZooError(f"image_size must be None, a positive int or a (height, width) pair, got {image_size!r}")


class _Reader:
    """Reads images one by one, resizing if asked and checking that all sizes agree."""

    def __init__(self, folder: Path, size: tuple[int, int] | None):
        self.folder = folder
        self.size = size
        self.first: tuple[Path, tuple[int, int]] | None = None

    def image(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        im = _open(path)
        native = (im.height, im.width)
        arr = _to_rgb_array(im)
        if self.size is not None and native != self.size:
            t = torch.nn.functional.interpolate(
                torch.from_numpy(arr)[None], size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
            arr = t[0].clamp_(0, 1).numpy()
        elif self.size is None:
            if self.first is None:
                self.first = (path, native)
            elif native != self.first[1]:
                (p0, (h0, w0)), (h, w) = self.first, native
                raise AnomalyZooError(
                    f"images in {self.folder} have different sizes ({p0.name} is {h0}x{w0}, "
                    f"{path.name} is {h}x{w}); pass image_size= to resize them"
                )
        return arr, native

    def mask(self, path: Path, image_path: Path, native: tuple[int, int]) -> np.ndarray:
        im = _open(path)
        if (im.height, im.width) != native:
            raise AnomalyZooError(
                f"mask {path} is {im.height}x{im.width} but its image {image_path} is {native[0]}x{native[1]}"
            )
        im = im.convert("L")
        if self.size is not None and native != self.size:
            im = im.resize((self.size[1], self.size[0]), Image.NEAREST)
        return (np.asarray(im) > 127).astype(np.float32)


def _find_mask(gt_folder: Path, image_path: Path) -> Path | None:
    for ext in (".png", image_path.suffix):
        cand = gt_folder / f"{image_path.stem}_mask{ext}"
        if cand.is_file():
            return cand
    return None


def read_folder(
    folder: str | os.PathLike,
    *,
    name: str = "mvtec",
    category: str | None = None,
    image_size=None,
    info: dict | None = None,
) -> AnomalyDataset:
    """Read one category folder in the MVTec AD layout into an :class:`AnomalyDataset`.

    Test images are ordered ``good`` first, then the defect folders alphabetically, each
    by file name. Masks are thresholded at 128; a defective image without a mask is an
    error when the set has a ``ground_truth`` folder, and the set is image-level only
    (``test_masks=None``) when it has none.
    """
    folder = Path(folder)
    size = _parse_size(image_size)
    train_dir, test_dir, gt_dir = folder / "train" / GOOD, folder / "test", folder / "ground_truth"
    if not train_dir.is_dir():
        raise AnomalyZooError(f"MVTec folder not found: {train_dir} does not exist (expected <root>/<category>/train/good)")
    if not test_dir.is_dir():
        raise AnomalyZooError(f"MVTec folder incomplete: {test_dir} does not exist (expected <root>/<category>/test/<defect>)")
    reader = _Reader(folder, size)

    train_files = _image_files(train_dir)
    if not train_files:
        raise AnomalyZooError(f"no training images in {train_dir} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    train = [reader.image(p)[0] for p in train_files]

    defects = _subfolders(test_dir)
    defects = ([GOOD] if GOOD in defects else []) + [d for d in defects if d != GOOD]
    has_gt = gt_dir.is_dir()
    test, masks, labels, kinds, names = [], [], [], [], []
    for defect in defects:
        for path in _image_files(test_dir / defect):
            img, native = reader.image(path)
            test.append(img)
            labels.append(int(defect != GOOD))
            kinds.append(defect)
            names.append(f"{defect}/{path.name}")
            if not has_gt:
                continue
            h, w = img.shape[-2:]
            mask_path = _find_mask(gt_dir / defect, path) if defect != GOOD else None
            if mask_path is None:
                if defect != GOOD:
                    raise AnomalyZooError(
                        f"no mask for {path}: expected {gt_dir / defect / (path.stem + '_mask.png')}"
                    )
                masks.append(np.zeros((h, w), np.float32))
            else:
                masks.append(reader.mask(mask_path, path, native))
    if not test:
        raise AnomalyZooError(f"no test images in {test_dir} (expected test/good/ and test/<defect>/ image folders)")

    weak_images, weak_labels = _read_weak(folder / "weak", reader)
    return AnomalyDataset(
        name=name,
        category=category if category is not None else folder.name,
        root=folder,
        train_images=torch.from_numpy(np.stack(train)),
        test_images=torch.from_numpy(np.stack(test)),
        test_labels=torch.tensor(labels, dtype=torch.int64),
        test_masks=torch.from_numpy(np.stack(masks)) if has_gt else None,
        test_defects=kinds,
        test_files=names,
        info=dict(info or {}),
        weak_images=weak_images,
        weak_labels=weak_labels,
    )


def _read_weak(weak_dir: Path, reader: _Reader) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weakly labelled split (``weak/good``: 0, ``weak/diseased``: 1), ``(None, None)`` without a ``weak`` folder."""
    if not weak_dir.is_dir():
        return None, None
    found = [(label, p) for label, sub in ((0, GOOD), (1, DISEASED)) if (weak_dir / sub).is_dir()
             for p in _image_files(weak_dir / sub)]
    others = sorted(set(_subfolders(weak_dir)) - {GOOD, DISEASED})
    if others or not found:
        raise AnomalyZooError(
            f"weak split in {weak_dir}: expected image folders weak/{GOOD} and weak/{DISEASED}"
            + (f", found {', '.join(others)}" if others else ", found no images")
        )
    images = np.stack([reader.image(p)[0] for _, p in found])
    return torch.from_numpy(images), torch.tensor([label for label, _ in found], dtype=torch.int64)


def categories(root: str | os.PathLike | None = None) -> list[str]:
    """Category folders (those holding ``train/good``) under an MVTec-layout root."""
    root = Path(root) if root is not None else data_root() / "mvtec"
    if not root.is_dir():
        return []
    return [c for c in _subfolders(root) if (root / c / "train" / GOOD).is_dir()]


def load_mvtec(root=None, category: str | None = None, image_size=None) -> AnomalyDataset:
    """Read ``<root>/<category>`` (MVTec AD layout).

    ``root`` defaults to ``<data root>/mvtec``. ``root`` may also be a category folder
    itself (one holding ``train/good``). Without ``category``, a root with a single
    category uses it. ``image_size`` (int or (h, w)) resizes images bilinearly and
    masks with nearest neighbour; without it all images must share one size.
    """
    root = data_root() / "mvtec" if root is None else Path(data_root(root))
    if category is not None and not isinstance(category, str):
        raise AnomalyZooError(f"category must be a string, got {type(category).__name__}")
    if category is None and (root / "train" / GOOD).is_dir():
        return read_folder(root, name="mvtec", category=root.name, image_size=image_size)
    if not root.is_dir():
        raise AnomalyZooError(
            f"MVTec folder not found: {root} does not exist (expected <root>/<category>/train/good; "
            "pass root= the folder you extracted MVTec AD into)"
        )
    present = categories(root)
    if category is None:
        if len(present) == 1:
            category = present[0]
        else:
            raise AnomalyZooError(
                f"load('mvtec') needs category=: the folder {root} holds "
                + (f"{', '.join(present)}" if present else "no category (no <category>/train/good folder)")
            )
    if not (root / category / "train" / GOOD).is_dir():
        have = ", ".join(present) if present else "none"
        raise AnomalyZooError(
            f"MVTec category {category!r} not found: expected {root / category / 'train' / GOOD}; "
            f"categories present in {root}: {have}"
        )
    return read_folder(root / category, name="mvtec", category=category, image_size=image_size)
