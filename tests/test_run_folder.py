"""A run owns its folder (core.run_folder): a fresh run refuses another run's outputs (or moves them aside), one live
run per folder (the lock, its heartbeat, a dead holder taken over), and a resume with a changed trajectory stops
listing the changes unless they are accepted. The last tests run ``rl.launch`` itself: it stops before Ray starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import checkpoint as ckpt
from core import run_folder
from core.config import load_config, to_yaml
from core.run_folder import FolderError, RunLock, check_resume, claim, config_changes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/grpo_random_local.yaml"


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(CONFIG, [f"output_dir={tmp_path / 'run'}", *overrides])


def _checkpoint(cfg, step: int, config_yaml: str = "") -> Path:
    tmp = ckpt.begin_checkpoint(cfg.trainer.checkpoint_dir, step)
    if config_yaml:
        (tmp / run_folder.CONFIG_FILE).write_text(config_yaml)
    ckpt.save_trainer_state(tmp, ckpt.TrainerState(step=step, data_cursor=step, rng=ckpt.capture_rng_state()))
    return ckpt.commit_checkpoint(tmp)


def test_a_fresh_run_into_another_runs_checkpoints_stops_naming_the_folder_and_the_ways_on(tmp_path):
    cfg = _cfg(tmp_path)
    old = _checkpoint(cfg, 8)
    with pytest.raises(FolderError) as err:
        with claim(cfg):
            pytest.fail("the run went on")
    message = str(err.value)
    assert str(cfg.output_dir) in message and "step_000008" in message
    for way in ("trainer.resume=auto", "output_dir=", "trainer.overwrite=true"):
        assert way in message
    assert ckpt.list_complete(cfg.trainer.checkpoint_dir) == [old]  # nothing touched
    assert not (Path(cfg.output_dir) / run_folder.LOCK_FILE).exists()  # the lock released


def test_tensorboard_points_alone_also_belong_to_another_run(tmp_path):
    cfg = _cfg(tmp_path)
    Path(cfg.trainer.log_dir).mkdir(parents=True)
    (Path(cfg.trainer.log_dir) / "events.out.tfevents.1.host").write_bytes(b"x")
    with pytest.raises(FolderError, match="TensorBoard event file"):
        with claim(cfg):
            pass


def test_overwrite_moves_the_old_outputs_aside_and_deletes_nothing(tmp_path):
    cfg = _cfg(tmp_path, "trainer.overwrite=true")
    _checkpoint(cfg, 8)
    Path(cfg.trainer.log_dir).mkdir(parents=True)
    (Path(cfg.trainer.log_dir) / "events.out.tfevents.1.host").write_bytes(b"old points")
    with claim(cfg):
        assert not Path(cfg.trainer.checkpoint_dir).exists() and not Path(cfg.trainer.log_dir).exists()
    moved = sorted(p.name for p in Path(cfg.output_dir).iterdir() if ".old-" in p.name)
    assert [m.split(".old-")[0] for m in moved] == ["checkpoints", "tensorboard"]
    old_ckpts = next(Path(cfg.output_dir).glob("checkpoints.old-*"))
    assert [p.name for p in ckpt.list_complete(old_ckpts)] == ["step_000008"]
    assert (Path(cfg.output_dir) / run_folder.CONFIG_FILE).read_text() == to_yaml(cfg)


def test_a_second_live_run_refuses_on_the_lock_naming_its_holder(tmp_path):
    cfg = _cfg(tmp_path)
    with claim(cfg):
        holder = json.loads((Path(cfg.output_dir) / run_folder.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FolderError, match=f"in use by a live run \\(pid {os.getpid()} on"):
            with claim(_cfg(tmp_path, "trainer.resume=auto")):
                pass
    with claim(_cfg(tmp_path)):  # released at the end of the first
        pass


def test_a_lock_left_by_a_dead_process_or_without_heartbeat_is_named_and_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = folder / run_folder.LOCK_FILE
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "started": "then"}))
    held = RunLock(folder)
    held.acquire()
    held.release()
    assert "its process is gone" in caplog.text and f"pid {int(gone.stdout)}" in caplog.text
    lock.write_text(json.dumps({"pid": 1, "host": "a-preempted-pod", "started": "then"}))
    with pytest.raises(FolderError, match="a-preempted-pod"):  # another host, fresh heartbeat: maybe alive
        RunLock(folder).acquire()
    old = time.time() - run_folder.STALE_AFTER_S - 10
    os.utime(lock, (old, old))
    held = RunLock(folder)
    held.acquire()
    assert "no heartbeat for" in caplog.text
    held.release()
    assert not lock.exists()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "HEARTBEAT_S", 0.05)
    held = RunLock(tmp_path)
    held.acquire()
    old = time.time() - 1000
    os.utime(held.path, (old, old))
    time.sleep(0.3)
    assert time.time() - held.path.stat().st_mtime < 5
    held.release()


def test_a_resume_with_a_changed_learning_rate_stops_listing_it_unless_accepted(tmp_path, caplog):
    first = _cfg(tmp_path)
    latest = _checkpoint(first, 4, to_yaml(first))
    longer = _cfg(tmp_path, "trainer.resume=auto", "trainer.total_steps=40", "rollout.num_actors=2")
    assert config_changes(to_yaml(first), longer) == []  # run length and resources are not the trajectory
    changed = _cfg(tmp_path, "trainer.resume=auto", "learner.policy_optim.lr=3e-4", "grpo.group_size=8")
    assert [k for k, _, _ in config_changes(to_yaml(first), changed)] == ["grpo.group_size",
                                                                         "learner.policy_optim.lr"]
    with pytest.raises(FolderError, match=r"learner.policy_optim.lr: 0.0001 -> 0.0003.*trainer.accept_changes=true"):
        with claim(changed):
            pass
    check_resume(_cfg(tmp_path, "trainer.resume=auto", "learner.policy_optim.lr=3e-4", "trainer.accept_changes=true"),
                 latest)
    assert "learner.policy_optim.lr: 0.0001 -> 0.0003" in caplog.text


def test_a_run_started_from_an_export_resumes_with_the_command_that_started_it(tmp_path):
    """``<model>.init_from``: the checkpoint's config holds the path of the run's copy (set after the folder check);
    the same command again is no change, another export is."""
    started = _cfg(tmp_path, "policy.init_from=/exports/a/policy")
    started.policy.path = str(tmp_path / "init" / "policy")  # what models.bootstrap.apply_init_from does
    again = _cfg(tmp_path, "policy.init_from=/exports/a/policy", "trainer.resume=auto")
    assert config_changes(to_yaml(started), again) == []
    other = _cfg(tmp_path, "policy.init_from=/exports/b/policy", "trainer.resume=auto")
    assert [k for k, _, _ in config_changes(to_yaml(started), other)] == ["policy.init_from", "policy.path"]


def _launch(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rl.launch", str(CONFIG), *overrides], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)


@pytest.mark.slow
def test_launch_into_a_used_folder_stops_before_ray_starts(tmp_path):
    """``make run`` twice into one folder: the second stops (exit 2) before any actor, naming the folder and the
    ways on; a run holding the folder's lock keeps a second one out the same way."""
    cfg = _cfg(tmp_path)
    _checkpoint(cfg, 16, to_yaml(cfg))
    out = _launch(f"output_dir={cfg.output_dir}", "trainer.progress_bar=false")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "run folder error" in out.stderr and str(cfg.output_dir) in out.stderr
    assert "trainer.overwrite=true" in out.stderr
    assert "starting a local Ray cluster" not in out.stdout + out.stderr  # no actor was built
    assert [p.name for p in ckpt.list_complete(cfg.trainer.checkpoint_dir)] == ["step_000016"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = Path(cfg.output_dir) / run_folder.LOCK_FILE
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}))
        out = _launch(f"output_dir={cfg.output_dir}", "trainer.resume=auto", "trainer.progress_bar=false")
        assert out.returncode == 2 and f"pid {holder.pid}" in out.stderr, out.stderr[-2000:]
    finally:
        holder.kill()
