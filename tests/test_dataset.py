"""PairDataset: the skimage default, folders, manifests, the held-out split, determinism per (seed, cursor)."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from core.chain import STAGES
from core.config import DataConfig
from data.dataset import DataSourceError, PairDataset, list_source, parse_tags, split_entries
from data.photos import PHOTOS, load_photo


def _write(path, h=80, w=96, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def default_train():
    return PairDataset(DataConfig())


def test_default_photos_load_and_their_tags_are_words_of_the_rough_caption():
    names = [p.name for p in PHOTOS]
    assert len(names) == len(set(names)) >= 12
    for photo in PHOTOS:
        image = load_photo(photo.name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 128
        if photo.gray:
            assert np.array_equal(image[..., 0], image[..., 2])
        assert set(photo.captions) == set(STAGES)
        lengths = [len(photo.captions[s].split()) for s in STAGES]
        assert lengths == sorted(lengths) and lengths[0] < lengths[-1], (photo.name, lengths)
        assert photo.tags and all(re.fullmatch(r"[a-z]+", t) for t in photo.tags), photo.tags
        for tag in photo.tags:
            assert re.search(rf"\b{tag}\b", photo.captions["rough"].lower()), (photo.name, tag)


def test_photos_match_scikit_image():
    import skimage.data

    assert np.array_equal(load_photo("astronaut"), skimage.data.astronaut())
    assert np.array_equal(load_photo("camera")[..., 1], skimage.data.camera())


def test_default_split_is_by_image_disjoint_and_seeded(default_train):
    cfg = DataConfig()
    held = PairDataset(cfg, "eval")
    assert not set(default_train.image_ids) & set(held.image_ids)
    assert set(default_train.image_ids) | set(held.image_ids) == {p.name for p in PHOTOS}
    assert len(held) == round(cfg.held_out_fraction * len(PHOTOS))
    other = PairDataset(replace(cfg, seed=1), "eval")
    assert other.image_ids != held.image_ids  # another seed, another split
    assert default_train.stats == {"missing": 0, "unreadable": 0, "too_small": 0}


def test_samples_are_deterministic_per_seed_and_cursor(default_train):
    cfg = DataConfig()
    again = PairDataset(cfg)
    for cursor in (0, 5, 123):
        a, b = default_train.sample(cursor), again.sample(cursor)
        assert a.prompt_id == cursor and a.image_id == b.image_id and a.tags == b.tags
        assert np.array_equal(a.hr, b.hr) and np.array_equal(a.lr, b.lr) and a.degradation == b.degradation
    # order of calls does not matter
    assert np.array_equal(again.sample(5).lr, default_train.batch(3, 4)[2].lr)
    other = PairDataset(replace(cfg, seed=3))
    assert not np.array_equal(other.sample(5).lr, default_train.sample(5).lr)


def test_sample_shapes_tags_and_wrap_around(default_train):
    cfg = DataConfig()
    batch = default_train.batch(10, 4)
    assert [s.prompt_id for s in batch] == [10, 11, 12, 13]
    for s in batch:
        assert s.hr.shape == (cfg.hr_size, cfg.hr_size, 3) and s.lr.shape == (16, 16, 3)
        assert s.tags == next(p.tags for p in PHOTOS if p.name == s.image_id)
    n = len(default_train)
    assert [default_train.sample(c).image_id for c in range(n)] == default_train.image_ids
    a, b = default_train.sample(2), default_train.sample(2 + n)
    assert a.image_id == b.image_id and not np.array_equal(a.hr, b.hr)  # same image, another crop


def test_folder_source_with_sidecar_and_tags_json(tmp_path):
    for i, name in enumerate(["a.png", "b.jpg", "c.png", "d.bmp"]):
        _write(tmp_path / name, seed=i)
    (tmp_path / "a.txt").write_text("Lion, rock\nsky")
    (tmp_path / "tags.json").write_text(json.dumps({"b.jpg": ["tree", "road"], "a": ["ignored"], "d": "x, y"}))
    (tmp_path / "notes.md").write_text("not an image")
    entries = {e.image_id: e for e in list_source(str(tmp_path))}
    assert sorted(entries) == ["a", "b", "c", "d"]
    assert entries["a"].tags == ("lion", "rock", "sky")  # the sidecar wins over tags.json
    assert entries["b"].tags == ("tree", "road") and entries["d"].tags == ("x", "y") and entries["c"].tags == ()
    ds = PairDataset(DataConfig(source=str(tmp_path), held_out_fraction=0.25))
    assert len(ds) == 3
    s = ds.sample(0)
    assert s.lr.shape == (16, 16, 3) and s.tags == entries[s.image_id].tags


def test_manifest_source_relative_paths_and_eval_source(tmp_path):
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(4):
        _write(tmp_path / "imgs" / f"p{i}.png", seed=i)
        lines.append(json.dumps({"image": f"imgs/p{i}.png", "tags": [f"tag{i}", "Common"]}))
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n\n")
    held = tmp_path / "held"
    held.mkdir()
    _write(held / "h.png")
    cfg = DataConfig(source=str(manifest), eval_source=str(held))
    train = PairDataset(cfg)
    assert sorted(train.image_ids) == ["imgs/p0", "imgs/p1", "imgs/p2", "imgs/p3"]  # no held-out cut
    assert train.sample(0).tags[1] == "common"
    assert PairDataset(cfg, "eval").image_ids == ["h"]


@pytest.mark.parametrize("line,message", [
    ('{"image": "a.png", "tags": ["x"]', r"m\.jsonl:2: invalid JSON"),
    ('{"tags": ["x"]}', r"m\.jsonl:2: missing key 'image'"),
    ('["a.png"]', r"m\.jsonl:2: missing key 'image'"),
    ('{"image": "a.png", "tags": 3}', r"m\.jsonl:2: tags must be"),
    ('{"image": ""}', r"m\.jsonl:2: 'image' must be"),
])
def test_bad_manifest_lines_name_the_line(tmp_path, line, message):
    _write(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png"}) + "\n" + line + "\n")
    with pytest.raises(DataSourceError, match=message):
        PairDataset(DataConfig(source=str(manifest)))


def test_bad_sources_and_settings_are_clear_errors(tmp_path):
    with pytest.raises(DataSourceError, match="manifest file not found"):
        PairDataset(DataConfig(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataSourceError, match="is not 'skimage'"):
        PairDataset(DataConfig(source=str(tmp_path / "nope")))
    with pytest.raises(DataSourceError, match="no image files"):
        PairDataset(DataConfig(source=str(tmp_path)))
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "tags.json").write_text("{broken")
    with pytest.raises(DataSourceError, match="tags.json: invalid JSON"):
        PairDataset(DataConfig(source=str(tmp_path)))
    with pytest.raises(ValueError, match="data.hr_size = 66"):
        PairDataset(DataConfig(hr_size=66))
    with pytest.raises(DataSourceError, match="eval split is empty"):
        PairDataset(DataConfig(held_out_fraction=0.0), "eval")
    with pytest.raises(ValueError, match="split must be"):
        PairDataset(DataConfig(), "test")


def test_split_entries_rules():
    from data.dataset import ImageEntry

    entries = [ImageEntry(f"i{k}", f"/x/i{k}.png", ()) for k in range(10)]
    train, held = split_entries(entries, 0.25, seed=0)
    assert len(held) == 2 and len(train) == 8
    assert split_entries(list(reversed(entries)), 0.25, seed=0) == (train, held)  # file order is irrelevant
    _, held2 = split_entries([*entries, ImageEntry("new", "/x/new.png", ())], 0.25, seed=0)
    assert len({e.image_id for e in held} & {e.image_id for e in held2}) >= 1  # adding one keeps most
    assert len(split_entries(entries[:2], 0.01, 0)[1]) == 1 and len(split_entries(entries[:1], 0.5, 0)[1]) == 0
    assert parse_tags(" A , b,,a\n c ") == ("a", "b", "c")
