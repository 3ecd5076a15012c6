"""A run owns its folder: one live run per ``output_dir``, a fresh run never mixes with or prunes another run's
checkpoints and TensorBoard points, and a resume never silently trains a config other than its checkpoint's.

    with claim(cfg):        # before any actor is built; both drivers (rl.launch, rl.one_process)
        ... the run ...

- **The lock** ``<output_dir>/run.lock`` (pid, host, start time) is kept fresh by a heartbeat thread. A second run
  finds it and stops, naming the holder; a lock whose process is gone (same host) or whose heartbeat stopped
  (``STALE_AFTER_S``, any host: a preempted pod) is named and taken over.
- **A fresh run** (``trainer.resume: false``) into a folder that holds checkpoints or TensorBoard events stops and
  names the ways on: ``trainer.resume=auto``, another ``output_dir``, or ``trainer.overwrite=true``, which moves
  the old ``checkpoints`` / ``tensorboard`` folders aside (``<name>.old-<time>``) and deletes nothing.
- **A resume** compares the config with the one saved in the checkpoint (``config.yaml``): keys that change the
  trajectory (everything but ``OPERATIONAL`` keys: run length, cadence, resources, deadlines) stop the run, listed
  with their old and new values, unless ``trainer.accept_changes=true``; then the new values take effect (the
  learner takes its optimizer hyperparameters from the config: ``learner.persistence.Checkpointer.load``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from core import checkpoint as ckpt
from core.config import ExperimentConfig, to_yaml

log = logging.getLogger("core.run_folder")
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0  # a lock not refreshed for this long belongs to a run that is gone
# keys a resume may change without trainer.accept_changes: how long, how often, where and with what it runs
OPERATIONAL = (
    "name", "output_dir", "cold_start", "ray.*", "trainer.total_steps", "trainer.log_dir", "trainer.checkpoint_dir",
    "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.image_every", "trainer.eval_every",
    "trainer.eval_images", "trainer.eval_panel.*", "trainer.resume", "trainer.max_failures",
    "trainer.max_skipped_steps", "trainer.progress_bar", "trainer.overwrite", "trainer.accept_changes",
    "*.num_actors", "*.num_cpus", "*.num_gpus", "*.max_restarts", "*.call_timeout_s", "*.sync_timeout_s",
    "learner.master_port", "policy.bootstrap", "diffusion.bootstrap",
)


class FolderError(RuntimeError):
    """The run cannot use its folder; the message names the folder and the ways on."""


# ------------------------------------------------------------------------------------------ the lock
class RunLock:
    """``<folder>/run.lock``, held while the run lives (``acquire`` / ``release``)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}, f)
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise FolderError(f"{self.path}: could not take the lock (another run took it meanwhile)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._owned():
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as exc:  # the folder went away: nothing to keep fresh
                log.warning("run lock %s: heartbeat failed: %s", self.path, exc)

    def _owned(self) -> bool:
        holder = _read_lock(self.path)
        return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()

    def _take_over_if_stale(self) -> None:
        holder = _read_lock(self.path)
        why = _stale(self.path, holder)
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
        if why is None:
            raise FolderError(f"{self.path.parent} is in use by a live run ({who}, {self.path}): wait for it to "
                              "end, or give this run another output_dir")
        log.warning("run lock %s left by %s (%s): taking it over", self.path, who, why)
        self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _stale(path: Path, holder: dict[str, Any]) -> str | None:
    """Why the lock's run is gone, or None when it may be alive."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "removed meanwhile"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return "its process is gone"
        except PermissionError:
            pass  # alive, another user's
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s"
    return None


# ------------------------------------------------------------------------------------------ fresh runs
def previous_outputs(cfg: ExperimentConfig) -> list[str]:
    """What another run left where this one writes: checkpoints (complete or not) and TensorBoard event files."""
    found = []
    root, logs = Path(cfg.trainer.checkpoint_dir), Path(cfg.trainer.log_dir)
    steps = sorted(p.name for p in root.glob("*step_*")) if root.is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint(s) in {root} ({', '.join(steps[-3:])})")
    events = list(logs.rglob("events.out.tfevents*")) if logs.is_dir() else []
    if events:
        found.append(f"{len(events)} TensorBoard event file(s) in {logs}")
    return found


def move_aside(cfg: ExperimentConfig) -> list[Path]:
    """``trainer.overwrite``: the checkpoint and TensorBoard folders renamed ``<name>.old-<UTC time>``; returns
    the new paths. Nothing is deleted."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in (Path(cfg.trainer.checkpoint_dir), Path(cfg.trainer.log_dir)):
        if path.exists():
            target = path.with_name(f"{path.name}.old-{stamp}")
            path.rename(target)
            moved.append(target)
    return moved


def check_fresh(cfg: ExperimentConfig) -> None:
    """A fresh run into a used folder: FolderError naming it and the ways on, or (``trainer.overwrite``) the old
    outputs moved aside."""
    found = previous_outputs(cfg)
    if not found:
        return
    if cfg.trainer.overwrite:
        for target in move_aside(cfg):
            log.warning("trainer.overwrite: the previous run's outputs moved to %s", target)
        return
    raise FolderError(f"{cfg.output_dir} holds another run's outputs: {'; '.join(found)}. A fresh run "
                      "(trainer.resume=false) would mix with them and prune their checkpoints. Continue that run "
                      "with trainer.resume=auto, write this one elsewhere with output_dir=<folder>, or set "
                      "trainer.overwrite=true to move the old outputs aside (nothing is deleted)")


# ------------------------------------------------------------------------------------------ resumes
def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(_flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out
    return {prefix.rstrip("."): tree}


def config_changes(saved_yaml: str, cfg: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this config's value) for every trajectory-changing key that differs. With the same
    ``<model>.init_from`` on both sides, ``<model>.path`` is not compared: the run points it at its own copy of
    init_from (``models.bootstrap.apply_init_from``) after this check, so the saved value is that copy."""
    old, new = _flat(yaml.safe_load(saved_yaml) or {}), _flat(yaml.safe_load(to_yaml(cfg)) or {})
    derived = {f"{m}.path" for m in ("policy", "diffusion")
               if new.get(f"{m}.init_from") and old.get(f"{m}.init_from") == new.get(f"{m}.init_from")}
    keys = sorted((set(old) | set(new)) - derived)
    return [(k, old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) and not any(fnmatch(k, pattern) for pattern in OPERATIONAL)]


def check_resume(cfg: ExperimentConfig, checkpoint: Path) -> None:
    """The resumed config against the checkpoint's: FolderError listing the changed keys, or (with
    ``trainer.accept_changes``) a warning listing them."""
    saved = checkpoint / CONFIG_FILE
    if not saved.is_file():
        log.warning("%s holds no %s (an older checkpoint): the config cannot be compared", checkpoint, CONFIG_FILE)
        return
    changes = config_changes(saved.read_text(), cfg)
    if not changes:
        return
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
    if cfg.trainer.accept_changes:
        log.warning("resuming %s with changed keys (trainer.accept_changes): %s", checkpoint, listed)
        return
    raise FolderError(f"resuming {checkpoint} with a config that changes its trajectory: {listed}. Set them back, "
                      "or set trainer.accept_changes=true to train on with the new values")


# ------------------------------------------------------------------------------------------ the claim
@contextmanager
def claim(cfg: ExperimentConfig) -> Iterator[None]:
    """The run's folder, locked and checked for the run's duration; its config written as ``config.yaml``."""
    out = Path(cfg.output_dir)
    lock = RunLock(out)
    lock.acquire()
    try:
        if cfg.trainer.resume is False:
            check_fresh(cfg)
        else:
            latest = ckpt.latest_complete(cfg.trainer.checkpoint_dir)
            if latest is not None:
                check_resume(cfg, latest)
        (out / CONFIG_FILE).write_text(to_yaml(cfg))
        yield
    finally:
        lock.release()
