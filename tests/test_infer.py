"""tools.infer and tools.inference: checkpoint resolution, LR sizing, and the CLI on a folder with a corrupt file.

The CLI runs in this process (``tools.infer.main``) on tiny bootstrap models with the HF engine and a short chain
(8 tokens per turn, 2 denoising steps): the test is about files, sizes and exit codes, not image quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import CheckpointError, write_checkpoint
from core.env import REPO_ROOT
from tools.inference import UsageError, check_at_least, crop_output, fit_lr, resolve_checkpoint, run_tool



@pytest.fixture(scope="module")
def models(tiny_models) -> Path:
    return tiny_models["policy"].parent  # an export: policy/ + diffusion/


@pytest.fixture(autouse=True)
def _keep_threads():
    """The CLI caps torch threads for its process; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _png(path: Path, h: int, w: int, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------------------ pure helpers
def test_fit_lr_pads_to_the_multiple_and_crop_output_undoes_it():
    image = np.arange(13 * 30 * 3, dtype=np.uint8).reshape(13, 30, 3)
    f = fit_lr(image, 8)
    assert f.lr.shape == (16, 32, 3) and f.size == (13, 30)
    assert np.array_equal(f.lr[:13, :30], image)  # padding only at the bottom/right: the input is untouched
    assert len(f.notes) == 1 and "30x13 -> 32x16" in f.notes[0]
    sr = np.zeros((16 * 4, 32 * 4, 3), np.uint8)
    assert crop_output(sr, f, 4).shape == (52, 120, 3)
    # already a multiple: unchanged, no note
    g = fit_lr(np.zeros((16, 24, 3), np.uint8), 8)
    assert g.lr.shape == (16, 24, 3) and g.notes == ()
    # smaller than the multiple: edge padding (reflect would need a larger image)
    assert fit_lr(np.zeros((3, 5, 3), np.uint8), 8).lr.shape == (8, 8, 3)


def test_fit_lr_max_side_downscales_before_padding():
    f = fit_lr(np.zeros((1000, 600, 3), np.uint8), 8, max_side=100)
    assert f.size == (100, 60) and f.lr.shape == (104, 64, 3)
    assert "downscaled 600x1000 -> 60x100" in f.notes[0]


def test_run_tool_says_a_users_error_in_one_line_and_lets_a_bug_raise(capsys):
    assert run_tool("rl.x", lambda: 0) == 0

    def bad_flag() -> int:
        check_at_least("--num", 0, 1)
        return 0

    assert run_tool("rl.x", bad_flag) == 2
    assert capsys.readouterr().err == "rl.x: --num 0 must be >= 1\n"
    with pytest.raises(UsageError, match="nan must be"):
        check_at_least("--vote-std", float("nan"), 0)

    def bug() -> int:
        raise ValueError("an internal contract")

    with pytest.raises(ValueError, match="internal contract"):  # a bug keeps its traceback
        run_tool("rl.x", bug)


def test_resolve_checkpoint_accepts_export_step_and_checkpoints_root(models, tmp_path):
    root = tmp_path / "runs" / "r" / "checkpoints"
    copy = lambda d: shutil.copytree(models, d / "export")
    write_checkpoint(root, 1, copy)
    write_checkpoint(root, 3, copy)
    (root / "step_000003" / "COMPLETE").unlink()  # step 3 never completed: must not be picked
    shutil.copy(REPO_ROOT / "configs" / "grpo_random_local.yaml", tmp_path / "runs" / "r" / "config.yaml")

    for arg in (root, root.parent, root / "step_000001", root / "step_000001" / "export"):
        ck = resolve_checkpoint(arg)
        assert ck.step == 1 and ck.export == (root / "step_000001" / "export").resolve()
        assert ck.run_config == root.parent / "config.yaml"
    ck = resolve_checkpoint(models)  # a bare export (the bootstrap layout)
    assert ck.step is None and ck.policy == (models / "policy").resolve() and ck.run_config is None
    with pytest.raises(CheckpointError, match="COMPLETE"):
        resolve_checkpoint(root / "step_000003")
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete step_N"):
        resolve_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------ the CLI
def test_infer_folder_writes_4x_outputs_and_skips_the_corrupt_file(models, tmp_path, capsys, fast_model_args):
    from tools.infer import main

    src = tmp_path / "in"
    src.mkdir()
    _png(src / "a.png", 16, 24, 0)
    _png(src / "b.png", 13, 21, 1)  # not a multiple of 8: padded, outputs cropped back to 4x
    (src / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header and nothing else
    (src / "notes.md").write_text("not an image suffix: ignored")
    out = tmp_path / "out"

    rc = main(["--checkpoint", str(models), "--input", str(src), "--output", str(out), *fast_model_args])
    err = capsys.readouterr().err

    assert rc == 0, err[-3000:]
    for name, (h, w) in {"a": (16, 24), "b": (13, 21)}.items():
        d = out / name
        assert sorted(p.name for p in d.iterdir()) == ["chain.txt", "middle.png", "rough.png", "sr.png"]
        assert Image.open(d / "sr.png").size == (w * 4, h * 4)
        assert Image.open(d / "middle.png").size == (w * 2, h * 2)
        assert Image.open(d / "rough.png").size == (w, h)
        text = (d / "chain.txt").read_text()
        assert "<final_image><|image|></final_image>" in text
    assert "padded 21x13 -> 24x16" in (out / "b" / "chain.txt").read_text()
    assert not (out / "c").exists()
    bad_lines = [line for line in err.splitlines() if "c.png" in line]
    assert len(bad_lines) == 1, bad_lines
    assert bad_lines[0].strip().startswith("skipped ") and str(src / "c.png") in bad_lines[0]
    assert "2 super-resolved, 1 skipped (unreadable)" in err


def test_an_ordinary_photo_is_downscaled_by_default_and_zero_turns_it_off():
    """Without --max-side a 4000 px photo would be a 16000 px (256 MP) 4x job; the default bounds the input side."""
    from tools.infer import DEFAULT_MAX_SIDE, build_parser

    base = ["--checkpoint", "c", "--input", "i", "--output", "o"]
    assert build_parser().parse_args(base).max_side == DEFAULT_MAX_SIDE == 512
    assert fit_lr(np.zeros((3000, 4000, 3), np.uint8), 8, DEFAULT_MAX_SIDE).lr.shape == (384, 512, 3)
    assert build_parser().parse_args([*base, "--max-side", "0"]).max_side == 0


def test_infer_exit_code_1_when_no_image_succeeds(models, tmp_path, capsys, fast_model_args):
    from tools.infer import main

    src = tmp_path / "in"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rc = main(["--checkpoint", str(models), "--input", str(src), "--output", str(tmp_path / "out"), *fast_model_args])
    err = capsys.readouterr().err
    assert rc == 1
    assert "skipped " + str(src / "broken.jpg") in err and "0 super-resolved, 1 skipped" in err


def test_infer_bad_arguments_exit_2_naming_the_path(tmp_path, capsys):
    from tools.infer import main

    rc = main(["--checkpoint", str(tmp_path / "missing"), "--input", str(tmp_path),
               "--output", str(tmp_path / "out")])
    assert rc == 2 and str(tmp_path / "missing") in capsys.readouterr().err


def test_infer_falls_back_to_hf_when_vllm_is_missing(models, tmp_path, capsys, monkeypatch):
    import sys

    from tools.infer import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, as on a machine without vllm
    src = tmp_path / "in"
    src.mkdir()
    _png(src / "a.png", 8, 8, 2)
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(models), "--input", str(src), "--output", str(out),
               "chain.max_stage_tokens=4", "diffusion.num_steps=1"])  # --engine defaults to vllm
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "vLLM engine is not usable (ModuleNotFoundError" in err and "using the HF engine instead" in err
    assert Image.open(out / "a" / "sr.png").size == (32, 32)
