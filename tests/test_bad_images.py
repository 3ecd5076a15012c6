"""Bad and unusual image files: converted soundly, or skipped with one log line naming the file and counted."""

import json
import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from core.config import DataConfig
from core.images import BadImageError, load_rgb, save_png, to_rgb_array
from data.dataset import DataSourceError, PairDataset


def _rgb(h=80, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _skip_records(caplog):
    return [r for r in caplog.records if r.name == "data" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------ load_rgb
def test_corrupt_truncated_and_missing_files_raise_bad_image_error(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png at all" * 10)
    good = tmp_path / "good.png"
    Image.fromarray(_rgb()).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:400])
    for path, reason in ((junk, "not a recognised image format"), (cut, "cannot decode"),
                         (tmp_path / "gone.png", "no such file"), (tmp_path, "not a regular file")):
        with pytest.raises(BadImageError) as info:
            load_rgb(path)
        assert info.value.path == str(path) and info.value.reason.startswith(reason)
        assert str(path) in str(info.value)


def test_grayscale_and_bilevel_become_rgb(tmp_path):
    gray = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (64, 64, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    Image.fromarray(gray > 127).save(tmp_path / "b.png")  # mode "1"
    assert set(np.unique(load_rgb(tmp_path / "b.png"))) == {0, 255}


def test_rgba_and_transparent_palette_are_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, :, 3] = 255  # opaque red-ish row
    rgba[1, :, 3] = 0  # fully transparent
    rgba[2, :, 3] = 128  # half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[1, 0].tolist() == [255, 255, 255]
    assert out[2, 0].tolist() == [227, 127, 127]  # 200a + 255(1-a) = 227.4, 255(1-a) = 127.0, a = 128/255
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png", transparency=0)
    out = load_rgb(tmp_path / "p.png")
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 20, 30]


def test_16_bit_png_is_rescaled_not_truncated(tmp_path):
    gray16 = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert load_rgb(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 1, 128, 255]
    rgb16 = np.zeros((1, 4, 3), np.uint16)
    rgb16[0, :, 0] = [0, 1000, 32768, 65535]  # red channel; Pillow alone would truncate 1000 to 3
    rgb16[0, :, 2] = 65535
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    out = load_rgb(tmp_path / "c16.png")
    assert out[0, :, 0].tolist() == [0, 4, 128, 255] and out[0, :, 2].tolist() == [255] * 4
    rgba16 = np.concatenate([rgb16, np.full((1, 4, 1), 65535, np.uint16)], -1)
    cv2.imwrite(str(tmp_path / "c16a.png"), rgba16[..., [2, 1, 0, 3]])
    assert np.array_equal(load_rgb(tmp_path / "c16a.png"), out)


def test_to_rgb_array_and_save_png(tmp_path):
    assert to_rgb_array(np.ones((2, 3), bool)).tolist() == [[[255] * 3] * 3] * 2
    assert to_rgb_array(np.full((2, 2, 1), 0.5, np.float32))[0, 0].tolist() == [128] * 3
    with pytest.raises(ValueError, match="shape"):
        to_rgb_array(np.zeros((2, 2, 2), np.uint8))
    image = _rgb(5, 7)
    path = save_png(tmp_path / "sub" / "x.png", image)
    assert np.array_equal(load_rgb(path), image)
    assert not [p for p in path.parent.iterdir() if p.name != "x.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "y.png", image.astype(np.float32))


# ------------------------------------------------------------------------------------------ dataset
def test_folder_with_bad_files_skips_each_once_and_counts(tmp_path, caplog):
    Image.fromarray(_rgb(seed=1)).save(tmp_path / "ok.png")
    Image.fromarray(_rgb(seed=2)[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([_rgb(seed=3), np.full((80, 80), 255, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((1, 80), 30000, np.uint16).repeat(80, 0)).save(tmp_path / "deep.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    Image.fromarray(_rgb(40, 100, seed=4)).save(tmp_path / "small.png")  # short side 40 >= 64/2: enlarged
    Image.fromarray(_rgb(20, 100, seed=5)).save(tmp_path / "tiny.png")  # short side 20 < 32: skipped
    with caplog.at_level(logging.INFO, logger="data"):
        ds = PairDataset(DataConfig(source=str(tmp_path), held_out_fraction=0.0))
        samples = ds.batch(0, 2 * len(ds))
    assert ds.stats == {"missing": 0, "unreadable": 1, "too_small": 1}
    assert ds.upscaled == ["small"]
    skips = _skip_records(caplog)
    assert len(skips) == 2  # one line per bad file, not one per sample
    assert any(str(tmp_path / "corrupt.jpg") in r.getMessage() for r in skips)
    assert any(str(tmp_path / "tiny.png") in r.getMessage() and "smaller than half" in r.getMessage() for r in skips)
    used = {s.image_id for s in samples}
    assert used == {"ok", "gray", "rgba", "deep", "small"}
    for s in samples:
        assert s.hr.shape == (64, 64, 3) and s.lr.shape == (16, 16, 3)
    assert ds._image(ds.image_ids.index("small")).shape[:2] == (64, 160)  # short side fits the crop exactly
    assert (ds._image(ds.image_ids.index("deep")) == 117).all()  # 30000 / 65535 * 255 = 116.7


def test_missing_file_in_manifest_is_skipped_with_its_path(tmp_path, caplog):
    Image.fromarray(_rgb()).save(tmp_path / "here.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "here.png", "tags": ["a"]}) + "\n"
                        + json.dumps({"image": "gone.png", "tags": ["b"]}) + "\n")
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = PairDataset(DataConfig(source=str(manifest), held_out_fraction=0.0))
    assert ds.stats["missing"] == 1
    (record,) = _skip_records(caplog)
    assert str(tmp_path / "gone.png") in record.getMessage() and "no such file" in record.getMessage()
    assert {ds.sample(c).image_id for c in range(4)} == {"here"}


def test_lazy_mode_skips_on_first_use_and_matches_preload(tmp_path, caplog):
    for i in range(4):
        Image.fromarray(_rgb(seed=i)).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"broken")
    cfg = DataConfig(source=str(tmp_path), held_out_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="data"):
        lazy = PairDataset(cfg, preload_max=0)
        assert lazy.stats["unreadable"] == 0 and not _skip_records(caplog)  # nothing decoded yet
        lazy_samples = [lazy.sample(c) for c in reversed(range(8))][::-1]
    assert lazy.stats["unreadable"] == 1 and len(_skip_records(caplog)) == 1
    eager = PairDataset(cfg)
    for a, b in zip(lazy_samples, eager.batch(0, 8)):
        assert a.image_id == b.image_id and np.array_equal(a.lr, b.lr)


def test_all_bad_is_an_error_naming_the_source(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    Image.fromarray(_rgb(10, 10)).save(tmp_path / "b.png")
    with pytest.raises(DataSourceError, match=f"data source {tmp_path}: no usable image"):
        PairDataset(DataConfig(source=str(tmp_path), held_out_fraction=0.0))
    lazy = PairDataset(DataConfig(source=str(tmp_path), held_out_fraction=0.0), preload_max=0)
    with pytest.raises(DataSourceError, match="no usable image"):
        lazy.sample(0)
