"""LR/HR training pairs: image sources, a deterministic held-out split, random HR crops, degradation.

Sources (``DataConfig.source`` / ``eval_source``):

- ``"skimage"``: the photographs scikit-image ships (``data.photos``), with hand-written tags.
- ``"confirmatory"``: photographs other installed packages ship that no recipe was chosen on
  (``data.test_photos``); meant for ``eval_source``.
- a folder: its image files (not recursive), sorted; tags from a sidecar ``<stem>.txt`` (comma- or
  line-separated), else from ``tags.json`` in the folder (``{"<file name or stem>": [tags] or "a, b"}``),
  else none.
- a ``.jsonl`` manifest: one ``{"image": path relative to the manifest, "tags": [...]}`` per line.

Bad input: a missing, unreadable or too small image is skipped with ONE warning on logger ``data``
naming the file, and counted in ``PairDataset.stats``; a bad manifest line or tags.json is an error naming
the file and line, and so is a source with no usable image.

Determinism: the split ranks images by a hash of (data.seed, image id), so it does not depend on file order
and adding an image moves at most one other across the boundary. ``sample(cursor)`` takes the first usable
image at or after position ``cursor % n`` of that order and draws its crop and degradation from a generator
seeded by (data.seed, split, cursor): the same config gives the same sample for a cursor, in any call order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.config import DataConfig
from core.images import IMAGE_SUFFIXES, BadImageError, load_rgb
from core.records import Sample
from data.degradations import degrade
from data.photos import PHOTOS, photo_path
from data.test_photos import CONFIRMATORY_PHOTOS, SOURCE_NAME, confirmatory_path

log = logging.getLogger("data")

SPLITS: dict[str, int] = {"train": 0, "eval": 1}  # split -> code mixed into the sampling seed
SKIP_REASONS: tuple[str, ...] = ("missing", "unreadable", "too_small")


class DataSourceError(ValueError):
    """A data source that cannot be used at all; the message names the source (and line, for manifests)."""


@dataclass(frozen=True)
class ImageEntry:
    image_id: str  # unique within the source: file stem, manifest path without suffix, or photo name
    path: str
    tags: tuple[str, ...]


# ------------------------------------------------------------------------------------------ sources
def parse_tags(value: Any, where: str = "tags") -> tuple[str, ...]:
    """Tags from a list of strings or a comma/line-separated string: stripped, lowercased, deduplicated.

    >>> parse_tags("Lion, rock,\\n sky, lion")
    ('lion', 'rock', 'sky')
    """
    if isinstance(value, str):
        items = value.replace("\n", ",").split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        items = list(value)
    else:
        raise DataSourceError(f"{where}: tags must be a list of strings or a comma-separated string, got {value!r}")
    return tuple(dict.fromkeys(t.strip().lower() for t in items if t.strip()))


def _unique_ids(ids: list[str], fallbacks: list[str]) -> list[str]:
    """Keep each id unless it repeats; repeated ones take their fallback, then a #k suffix."""
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    out, seen = [], set()
    for i, fb in zip(ids, fallbacks):
        name = i if counts[i] == 1 else fb
        base, k = name, 2
        while name in seen:
            name, k = f"{base}#{k}", k + 1
        seen.add(name)
        out.append(name)
    return out


def skimage_entries() -> list[ImageEntry]:
    return [ImageEntry(p.name, str(photo_path(p.name)), p.tags) for p in PHOTOS]


def confirmatory_entries() -> list[ImageEntry]:
    return [ImageEntry(p.name, str(confirmatory_path(p.name)), p.tags) for p in CONFIRMATORY_PHOTOS]


def folder_entries(folder: Path) -> list[ImageEntry]:
    files = sorted(f for f in folder.iterdir()
                   if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and not f.is_dir())
    if not files:
        raise DataSourceError(f"data source {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    table: dict[str, Any] = {}
    tags_json = folder / "tags.json"
    if tags_json.is_file():
        try:
            table = json.loads(tags_json.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataSourceError(f"{tags_json}: invalid JSON ({exc})") from None
        if not isinstance(table, dict):
            raise DataSourceError(f"{tags_json}: expected an object mapping file names to tags")
    ids = _unique_ids([f.stem for f in files], [f.name for f in files])
    entries = []
    for image_id, f in zip(ids, files):
        sidecar = f.with_suffix(".txt")
        if sidecar.is_file():
            tags = parse_tags(sidecar.read_text(encoding="utf-8", errors="replace"), str(sidecar))
        elif f.name in table or f.stem in table:
            tags = parse_tags(table.get(f.name, table.get(f.stem)), f"{tags_json} [{f.name}]")
        else:
            tags = ()
        entries.append(ImageEntry(image_id, str(f), tags))
    return entries


def manifest_entries(manifest: Path) -> list[ImageEntry]:
    rows: list[tuple[Path, tuple[str, ...], str]] = []
    with open(manifest, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict) or "image" not in rec:
                raise DataSourceError(f"{where}: missing key 'image' (expected {{\"image\": path, \"tags\": [...]}})")
            if not isinstance(rec["image"], str) or not rec["image"].strip():
                raise DataSourceError(f"{where}: 'image' must be a non-empty path string, got {rec['image']!r}")
            rel = rec["image"].strip()
            path = Path(rel) if Path(rel).is_absolute() else manifest.parent / rel
            rows.append((path, parse_tags(rec.get("tags", []), where), Path(rel).with_suffix("").as_posix()))
    if not rows:
        raise DataSourceError(f"data source {manifest}: the manifest lists no images")
    ids = _unique_ids([r[2] for r in rows], [Path(r[2]).as_posix() for r in rows])
    return [ImageEntry(i, str(p), tags) for i, (p, tags, _) in zip(ids, rows)]


def list_source(source: str) -> list[ImageEntry]:
    """Every image a source names, with its tags (nothing decoded yet)."""
    if source == "skimage":
        return skimage_entries()
    if source == SOURCE_NAME:
        return confirmatory_entries()
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_entries(path)
    if path.suffix.lower() == ".jsonl":
        if not path.is_file():
            raise DataSourceError(f"data source {source}: manifest file not found")
        return manifest_entries(path)
    raise DataSourceError(f"data source {source!r} is not 'skimage', {SOURCE_NAME!r}, an existing folder, "
                          "or a .jsonl manifest")


def split_entries(entries: list[ImageEntry], held_out_fraction: float,
                  seed: int) -> tuple[list[ImageEntry], list[ImageEntry]]:
    """(train, held-out), by image. Ranked by sha256(seed/id); the first round(fraction * n) are held out
    (at least 1 when the fraction is > 0, at most n - 1 when it is < 1). Both lists keep the rank order."""
    ranked = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}/{e.image_id}".encode()).hexdigest())
    n = len(ranked)
    n_eval = 0 if held_out_fraction <= 0 else max(1, round(held_out_fraction * n))
    if held_out_fraction < 1:
        n_eval = max(0, min(n_eval, n - 1))
    return ranked[n_eval:], ranked[:n_eval]


# ------------------------------------------------------------------------------------------ dataset
class PairDataset:
    """LR/HR pairs from one split of a source, deterministic per (config, cursor).

    ``split="train"``: the training images of ``cfg.source`` (all of them when ``cfg.eval_source`` is set).
    ``split="eval"``: ``cfg.eval_source`` when set, else the held-out images of ``cfg.source``.
    Decoded images are cached (least recently used out beyond ``cache_mb``); sources of up to
    ``preload_max`` images are decoded at construction, so bad files are reported before training starts.
    """

    def __init__(self, cfg: DataConfig, split: str = "train", cache_mb: float = 2048.0, preload_max: int = 2048):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if cfg.scale < 1 or cfg.hr_size < cfg.scale or cfg.hr_size % cfg.scale:
            raise ValueError(f"data.hr_size = {cfg.hr_size} must be a positive multiple of data.scale = {cfg.scale}")
        if not 0 <= cfg.held_out_fraction < 1:
            raise ValueError(f"data.held_out_fraction = {cfg.held_out_fraction} must be in [0, 1)")
        self.cfg = cfg
        self.split = split
        if cfg.eval_source:
            self.source = cfg.eval_source if split == "eval" else cfg.source
            entries = split_entries(list_source(self.source), 0.0, cfg.seed)[0]  # all, in rank order
        else:
            self.source = cfg.source
            train, held_out = split_entries(list_source(self.source), cfg.held_out_fraction, cfg.seed)
            entries = train if split == "train" else held_out
        if not entries:
            raise DataSourceError(f"data source {self.source}: the {split} split is empty "
                                  f"(data.held_out_fraction = {cfg.held_out_fraction})")
        self.entries: list[ImageEntry] = entries
        self.stats: dict[str, int] = {reason: 0 for reason in SKIP_REASONS}  # skipped files by reason
        self.upscaled: list[str] = []  # ids of images enlarged to fit the crop
        self._bad: set[int] = set()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_mb * 2**20)
        if len(entries) <= preload_max:
            usable = [i for i in range(len(entries)) if self._image(i) is not None]
            if not usable:
                self._raise_empty()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def image_ids(self) -> list[str]:
        return [e.image_id for e in self.entries]

    def sample(self, cursor: int) -> Sample:
        """The pair for data position ``cursor`` (>= 0); ``prompt_id = cursor``."""
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor}")
        n = len(self.entries)
        for step in range(n):
            index = (cursor + step) % n
            image = self._image(index)
            if image is not None:
                break
        else:
            self._raise_empty()
        entry = self.entries[index]
        rng = np.random.default_rng([self.cfg.seed, SPLITS[self.split], cursor])
        size = self.cfg.hr_size
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        hr = image[top : top + size, left : left + size].copy()  # (size, size, 3) uint8
        lr, labels = degrade(hr, self.cfg.degradation, self.cfg.scale, rng)
        return Sample(prompt_id=cursor, image_id=entry.image_id, lr=lr, hr=hr, tags=entry.tags,
                      degradation=labels)

    def batch(self, cursor: int, n: int) -> list[Sample]:
        """Samples for positions cursor .. cursor + n - 1."""
        return [self.sample(cursor + i) for i in range(n)]

    # -------------------------------------------------------------------------------------- internals
    def _raise_empty(self) -> None:
        raise DataSourceError(f"data source {self.source}: no usable image in the {self.split} split "
                              f"({len(self.entries)} listed, skipped: {self.stats})")

    def _skip(self, index: int, reason: str, detail: str) -> None:
        self._bad.add(index)
        self.stats[reason] += 1
        log.warning("skipping image %s: %s", self.entries[index].path, detail)

    def _image(self, index: int) -> np.ndarray | None:
        """The decoded (and, if needed, enlarged) image at ``index``, or None once it is known to be bad."""
        if index in self._bad:
            return None
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        entry = self.entries[index]
        try:
            image = load_rgb(entry.path)
        except BadImageError as exc:
            self._skip(index, "missing" if exc.reason == "no such file" else "unreadable", exc.reason)
            return None
        image = self._fit(index, image)
        if image is not None:
            self._cache[index] = image
            self._cache_bytes += image.nbytes
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return image

    def _fit(self, index: int, image: np.ndarray) -> np.ndarray | None:
        """Enlarge an image whose short side is below the crop (if at least half of it), else skip it."""
        size = self.cfg.hr_size
        h, w = image.shape[:2]
        short = min(h, w)
        if short >= size:
            return image
        if 2 * short < size:
            self._skip(index, "too_small", f"{w}x{h} px is smaller than half the {size} px crop (data.hr_size)")
            return None
        factor = size / short
        new_h, new_w = max(size, math.ceil(h * factor - 1e-9)), max(size, math.ceil(w * factor - 1e-9))
        self.upscaled.append(self.entries[index].image_id)
        log.info("enlarging image %s from %dx%d to %dx%d px to fit the %d px crop",
                 self.entries[index].path, w, h, new_w, new_h, size)
        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
