"""The confirmatory photo set (data.test_photos): files resolve and are the pinned photos, each has a licence, none
is one of data.photos' photographs, and ``data.eval_source: confirmatory`` serves crops of them, deterministically."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.config import DataConfig
from core.images import load_rgb
from data.dataset import DataSourceError, PairDataset, list_source
from data.photos import PHOTOS, photo_path
from data.test_photos import CONFIRMATORY_PHOTOS, SOURCE_NAME, confirmatory_path

NAMES = [p.name for p in CONFIRMATORY_PHOTOS]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("photo", CONFIRMATORY_PHOTOS, ids=NAMES)
def test_entry_resolves_to_the_pinned_rgb_photo(photo):
    path = confirmatory_path(photo.name)
    assert path.is_file(), f"{photo.name}: {path} missing ({photo.package} not installed or changed)"
    assert hashlib.sha256(path.read_bytes()).hexdigest()[:16] == photo.sha256, f"{path} changed"
    image = load_rgb(path)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert min(image.shape[:2]) >= 128, image.shape
    assert image.std() > 10  # a photograph, not a flat field


@pytest.mark.parametrize("photo", CONFIRMATORY_PHOTOS, ids=NAMES)
def test_entry_has_a_licence_and_tags_of_its_caption(photo):
    assert photo.licence.strip()
    assert photo.tags and all(t == t.lower() and " " not in t for t in photo.tags)
    words = set(re.findall(r"[a-z]+", photo.rough.lower()))
    assert set(photo.tags) <= words, set(photo.tags) - words


def test_no_entry_is_a_photo_of_data_photos():
    training_files = {photo_path(p.name).resolve() for p in PHOTOS}
    training_hashes = {hashlib.sha256(f.read_bytes()).hexdigest() for f in training_files}
    names = {p.name for p in PHOTOS}
    for photo in CONFIRMATORY_PHOTOS:
        path = confirmatory_path(photo.name).resolve()
        assert path not in training_files and photo.name not in names
        assert hashlib.sha256(path.read_bytes()).hexdigest() not in training_hashes
    assert len(set(NAMES)) == len(NAMES)


def test_list_source_names_the_set():
    assert [e.image_id for e in list_source(SOURCE_NAME)] == NAMES
    with pytest.raises(DataSourceError, match="'confirmatory'"):
        list_source("no-such-source")


def test_eval_source_serves_crops_of_the_set_deterministically():
    cfg = DataConfig(source="skimage", eval_source=SOURCE_NAME)
    n = 2 * len(CONFIRMATORY_PHOTOS)
    first = PairDataset(cfg, "eval").batch(0, n)
    again = PairDataset(cfg, "eval").batch(0, n)
    assert {s.image_id for s in first} == set(NAMES)  # every photo, and nothing else
    for a, b in zip(first, again):
        assert a.image_id == b.image_id and a.degradation == b.degradation
        np.testing.assert_array_equal(a.hr, b.hr)
        np.testing.assert_array_equal(a.lr, b.lr)
        assert a.hr.shape == (cfg.hr_size, cfg.hr_size, 3)
    train = PairDataset(cfg, "train")  # with an eval_source, training keeps every photo of data.photos
    assert sorted(train.image_ids) == sorted(p.name for p in PHOTOS)


def test_listing_the_set_imports_none_of_the_packages_it_reads():
    code = ("import sys\nfrom data.dataset import list_source\nlist_source('confirmatory')\n"
            "print(sorted(m for m in ('ray', 'matplotlib', 'pyiqa') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
