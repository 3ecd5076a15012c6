"""core.checkpoint: atomic directories, crash leftovers never picked, prune, trainer/RNG state round trip."""

import json
import random

import numpy as np
import pytest
import torch

from core import checkpoint as ck


def _write_files(d, payload=b"weights"):
    (d / "learner").mkdir()
    (d / "learner" / "model.bin").write_bytes(payload)
    (d / "meta.json").write_text('{"ok": true}')


def test_write_checkpoint_commits_with_manifest(tmp_path):
    path = ck.write_checkpoint(tmp_path, 10, _write_files)
    assert path == tmp_path / "step_000010" and path.is_dir()
    manifest = json.loads((path / ck.MARKER).read_text())
    assert manifest == {"format": 1, "step": 10, "files": {"learner/model.bin": 7, "meta.json": 12}}
    assert ck.verify_checkpoint(path) == ck.Manifest(step=10, files={"learner/model.bin": 7, "meta.json": 12})
    assert ck.latest_complete(tmp_path) == path
    assert [p.name for p in tmp_path.iterdir()] == ["step_000010"]  # no tmp left behind


def test_half_written_and_corrupt_checkpoints_are_never_picked(tmp_path):
    good = ck.write_checkpoint(tmp_path, 10, _write_files)

    # crash before the rename: files and even the marker written, but still a tmp directory
    tmp = ck.begin_checkpoint(tmp_path, 30)
    _write_files(tmp)
    (tmp / ck.MARKER).write_text(json.dumps({"format": 1, "step": 30, "files": {}}))
    # a step directory whose marker is garbage (e.g. torn write on a broken file system)
    bad_json = tmp_path / "step_000040"
    bad_json.mkdir()
    _write_files(bad_json)
    (bad_json / ck.MARKER).write_text('{"format": 1, "step": 4')
    # a step directory with no marker at all
    (tmp_path / "step_000050").mkdir()
    # a step directory whose files do not match the manifest (truncated weights)
    truncated = ck.write_checkpoint(tmp_path, 60, _write_files)
    (truncated / "learner" / "model.bin").write_bytes(b"we")
    # a manifest that claims another step than its directory name
    wrong_step = ck.write_checkpoint(tmp_path, 70, _write_files)
    (wrong_step / ck.MARKER).write_text(json.dumps({"format": 1, "step": 71, "files": {}}))
    # a manifest listing a file that is gone
    missing = ck.write_checkpoint(tmp_path, 80, _write_files)
    (missing / "meta.json").unlink()

    assert ck.latest_complete(tmp_path) == good
    assert ck.list_complete(tmp_path) == [good]
    for path, reason in [(bad_json, "unreadable manifest"), (tmp_path / "step_000050", "missing"),
                         (truncated, "size 2 != 7"), (wrong_step, "step 71 does not match"),
                         (missing, "meta.json: listed in the manifest but missing")]:
        with pytest.raises(ck.CheckpointError, match=reason):
            ck.verify_checkpoint(path)


def test_failed_write_leaves_nothing_and_keeps_previous(tmp_path):
    good = ck.write_checkpoint(tmp_path, 1, _write_files)

    def crash(d):
        _write_files(d)
        raise RuntimeError("learner died")

    with pytest.raises(RuntimeError, match="learner died"):
        ck.write_checkpoint(tmp_path, 2, crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    assert ck.latest_complete(tmp_path) == good


def test_commit_replaces_a_broken_directory_of_the_same_step(tmp_path):
    broken = tmp_path / "step_000020"
    broken.mkdir()
    (broken / "junk").write_text("x")
    path = ck.write_checkpoint(tmp_path, 20, _write_files)
    assert path == broken and ck.is_complete(path) and not (path / "junk").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000020"]


def test_latest_complete_orders_by_step_number(tmp_path):
    assert ck.latest_complete(tmp_path / "nothing") is None
    for step in (9, 1_000_000, 10):  # 1,000,000 has seven digits: the number, not the name, decides
        ck.write_checkpoint(tmp_path, step, _write_files)
    assert ck.latest_complete(tmp_path).name == "step_1000000"


def test_prune_keeps_the_newest_complete_and_removes_stale_tmp(tmp_path):
    for step in (10, 20, 30, 40):
        ck.write_checkpoint(tmp_path, step, _write_files)
    stale_tmp = ck.begin_checkpoint(tmp_path, 25)  # crashed write of an older step
    live_tmp = ck.begin_checkpoint(tmp_path, 50)  # a write in progress: must survive
    broken = tmp_path / "step_000005"
    broken.mkdir()

    removed = ck.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == sorted(["step_000010", "step_000020", stale_tmp.name])
    assert [p.name for p in ck.list_complete(tmp_path)] == ["step_000030", "step_000040"]
    assert live_tmp.exists() and broken.exists()
    assert ck.prune(tmp_path, keep=2) == []
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        ck.prune(tmp_path, keep=0)


def _draw():
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist() + [float(np.random.normal())],
        torch.rand(3).tolist() + torch.randint(0, 1000, (2,)).tolist(),
    )


def test_trainer_state_round_trip_reproduces_random_numbers(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()  # move the generators away from their seeds
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    extra = {"policy_version": 3, "np_gen": np.random.default_rng(5).bit_generator.state}
    state = ck.TrainerState(step=12, data_cursor=48, rng=ck.capture_rng_state(), extra=extra)
    expected = _draw() + ([random.gauss(0, 1)],)
    ck.save_trainer_state(tmp_path, state)
    assert (tmp_path / ck.TRAINER_STATE_FILE).exists() and (tmp_path / ck.RNG_TENSORS_FILE).exists()

    _draw()  # the run goes on, then "crashes"
    loaded = ck.load_trainer_state(tmp_path)
    ck.restore_rng_state(loaded.rng)
    assert _draw() + ([random.gauss(0, 1)],) == expected
    assert (loaded.step, loaded.data_cursor, loaded.extra["policy_version"]) == (12, 48, 3)
    gen = np.random.default_rng()
    gen.bit_generator.state = loaded.extra["np_gen"]
    assert gen.random() == np.random.default_rng(5).random()


def test_trainer_state_errors_name_the_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="trainer_state.json: cannot read trainer state"):
        ck.load_trainer_state(tmp_path)
    state = ck.TrainerState(step=1, data_cursor=0, rng=ck.capture_rng_state())
    ck.save_trainer_state(tmp_path, state)
    (tmp_path / ck.RNG_TENSORS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(ck.CheckpointError, match="rng_state.safetensors: cannot read torch RNG state"):
        ck.load_trainer_state(tmp_path)
    with pytest.raises(ValueError, match="extra must be JSON-serialisable"):
        ck.save_trainer_state(tmp_path, ck.TrainerState(1, 0, state.rng, extra={"x": object()}))


def test_trainer_state_inside_an_atomic_checkpoint(tmp_path):
    state = ck.TrainerState(step=7, data_cursor=28, rng=ck.capture_rng_state())
    path = ck.write_checkpoint(tmp_path, 7, lambda d: ck.save_trainer_state(d, state))
    assert set(ck.verify_checkpoint(path).files) == {ck.TRAINER_STATE_FILE, ck.RNG_TENSORS_FILE}
    assert ck.load_trainer_state(ck.latest_complete(tmp_path)).data_cursor == 28
