"""Atomic checkpoint directories and the trainer's own state (step, data cursor, RNG states).

A checkpoint is written into ``<root>/.tmp-step_000010-<uuid>/`` (by the driver and, through the shared
path, by learner ranks), every file is fsync'd, a ``COMPLETE`` marker with a JSON manifest (step, files
and sizes) is written last, and one ``os.rename`` publishes it as ``<root>/step_000010``. A crash at any
moment leaves either the previous checkpoints untouched or the new one complete: ``latest_complete``
ignores tmp directories and any ``step_*`` directory whose marker is missing, unreadable or disagrees
with the files on disk. Nothing here is pickled: JSON and safetensors only.

    path = write_checkpoint(root, step, lambda d: (learner.save(d / "learner"), save_trainer_state(d, st)))
    prune(root, keep=2)
    resume = latest_complete(root)          # None: start fresh
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
FORMAT_VERSION = 1
TRAINER_STATE_FILE = "trainer_state.json"
RNG_TENSORS_FILE = "rng_state.safetensors"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-step_(\d+)-[0-9a-f]+$")

PathLike = str | os.PathLike


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the path and the problem."""


def step_dir_name(step: int) -> str:
    """``step_000010``; zero-padded so names sort by step (up to 999,999; larger steps still parse)."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    return f"step_{step:06d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sizes(directory: Path) -> dict[str, int]:
    """Relative posix path -> size for every regular file under ``directory`` (the marker excluded)."""
    sizes = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(directory).as_posix()
            if rel != MARKER:
                sizes[rel] = path.stat().st_size
    return sizes


# ------------------------------------------------------------------------------------------ write
def _publish(tmp: Path, final: Path, replace: bool) -> None:
    """Rename the finished ``tmp`` directory to ``final`` (one POSIX rename: readers see all or nothing).

    ``replace``: an existing ``final`` is moved aside first and deleted after, so it is never half old, half
    new. Otherwise an existing ``final`` (another process built the same thing meanwhile) wins and ``tmp`` is
    discarded."""
    old = None
    if final.exists() and replace:
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if replace or not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """``with atomic_dir(final) as tmp:`` write into ``tmp``; on success it is renamed to ``final``, on error
    removed. A ``final`` another process created meanwhile wins (both were built from the same config). Used
    for models built on first use; checkpoints add a manifest (``begin_checkpoint`` / ``commit_checkpoint``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final, replace=False)


def begin_checkpoint(root: PathLike, step: int) -> Path:
    """Create and return the private tmp directory ``<root>/.tmp-step_N-<uuid>/`` to write into."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def commit_checkpoint(tmp: PathLike) -> Path:
    """fsync every file in ``tmp``, write the COMPLETE manifest, rename to ``<root>/step_N``; return it.

    An existing ``step_N`` (say a corrupt one left by an earlier run that resumed from before it) is moved
    aside first and deleted after the rename, so ``step_N`` is never half old, half new.
    """
    tmp = Path(tmp)
    match = _TMP_RE.match(tmp.name)
    if not match or not tmp.is_dir():
        raise CheckpointError(f"{tmp}: not a tmp checkpoint directory made by begin_checkpoint")
    step = int(match.group(1))
    files = _file_sizes(tmp)
    for rel in files:
        _fsync_path(tmp / rel)
    manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
    marker = tmp / MARKER
    with open(marker, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted([p for p in tmp.rglob("*") if p.is_dir()] + [tmp], key=lambda p: -len(p.parts)):
        _fsync_path(d)  # directory entries of the new files, deepest first

    final = tmp.parent / step_dir_name(step)
    _publish(tmp, final, replace=True)
    _fsync_path(tmp.parent)
    return final


def abort_checkpoint(tmp: PathLike) -> None:
    """Remove an unfinished tmp directory (after a failed write)."""
    shutil.rmtree(tmp, ignore_errors=True)


def write_checkpoint(root: PathLike, step: int, write: Callable[[Path], Any]) -> Path:
    """begin -> ``write(tmp_dir)`` -> commit; if ``write`` raises, the tmp directory is removed and
    the error propagates, leaving earlier checkpoints as they were."""
    tmp = begin_checkpoint(root, step)
    try:
        write(tmp)
    except BaseException:
        abort_checkpoint(tmp)
        raise
    return commit_checkpoint(tmp)


# ------------------------------------------------------------------------------------------ read
@dataclass(frozen=True)
class Manifest:
    step: int
    files: dict[str, int]  # relative posix path -> size in bytes


def verify_checkpoint(path: PathLike) -> Manifest:
    """The manifest of a complete checkpoint directory; raises CheckpointError saying what is wrong."""
    path = Path(path)
    match = _STEP_RE.match(path.name)
    if not match:
        raise CheckpointError(f"{path}: not a step_N checkpoint directory")
    marker = path / MARKER
    try:
        manifest = json.loads(marker.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{marker}: missing (checkpoint never completed)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{marker}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{marker}: not a format-{FORMAT_VERSION} manifest: {str(manifest)[:200]}")
    step, files = manifest.get("step"), manifest.get("files")
    if step != int(match.group(1)):
        raise CheckpointError(f"{marker}: step {step!r} does not match the directory name {path.name}")
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        raise CheckpointError(f"{marker}: 'files' must map paths to sizes, got {str(files)[:200]}")
    for rel, size in files.items():
        file = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CheckpointError(f"{marker}: file path {rel!r} leaves the checkpoint directory")
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the manifest but missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: size {file.stat().st_size} != {size} in the manifest")
    return Manifest(step=step, files=dict(files))


def is_complete(path: PathLike) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def list_complete(root: PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest step first (tmp and broken directories skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_complete(root: PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    complete = list_complete(root)
    return complete[-1] if complete else None


def prune(root: PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints; return what was removed.

    Also removes tmp/old directories of steps older than the newest complete checkpoint: leftovers of
    crashed writes (a live writer only ever writes a newer step). Broken ``step_*`` directories are left
    for a human to inspect.
    """
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    root = Path(root)
    complete = list_complete(root)
    removed = complete[:-keep]
    newest = int(_STEP_RE.match(complete[-1].name).group(1)) if complete else None  # type: ignore[union-attr]
    if newest is not None:
        for p in root.iterdir():
            m = re.match(r"^\.(?:tmp|old)-step_(\d+)-[0-9a-f]+$", p.name)
            if m and p.is_dir() and int(m.group(1)) < newest:
                removed.append(p)
    for p in removed:
        shutil.rmtree(p)
    return removed


# ------------------------------------------------------------------------------------------ trainer state
@dataclass
class RngState:
    """The global RNG states of python, numpy and torch (CPU and every CUDA device)."""

    python: tuple  # random.getstate(): (version, tuple of 625 ints, gauss_next)
    numpy: dict  # np.random.get_state(legacy=False)
    torch_cpu: torch.Tensor  # (K,) uint8
    torch_cuda: tuple[torch.Tensor, ...] = ()  # one (K,) uint8 per device; () without CUDA


def capture_rng_state() -> RngState:
    cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else ()
    return RngState(
        python=random.getstate(),
        numpy=np.random.get_state(legacy=False),
        torch_cpu=torch.get_rng_state(),
        torch_cuda=cuda,
    )


def restore_rng_state(state: RngState) -> None:
    """Set the global RNGs; CUDA states are restored when this process sees as many devices as were saved."""
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(state.torch_cuda):
        torch.cuda.set_rng_state_all(list(state.torch_cuda))


@dataclass
class TrainerState:
    """What the driver needs to continue exactly where it stopped (models and optimizers are saved by
    their owners into the same checkpoint directory)."""

    step: int  # last completed step
    data_cursor: int  # position of the next prompt in the data stream
    rng: RngState
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable, e.g. a numpy Generator's
    # bit_generator.state or the policy version


def _numpy_state_to_json(state: dict) -> dict:
    inner = state["state"]
    return {**state, "state": {**inner, "key": np.asarray(inner["key"]).tolist()}}


def _numpy_state_from_json(state: dict) -> dict:
    inner = state["state"]
    return {**state, "state": {**inner, "key": np.asarray(inner["key"], dtype=np.uint32)}}


def save_trainer_state(directory: PathLike, state: TrainerState) -> None:
    """Write ``trainer_state.json`` (step, cursor, extra, python/numpy RNG) and ``rng_state.safetensors``
    (torch RNG tensors) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    version, internal, gauss = state.rng.python
    doc = {
        "format": FORMAT_VERSION,
        "step": int(state.step),
        "data_cursor": int(state.data_cursor),
        "extra": state.extra,
        "rng": {"python": [version, list(internal), gauss], "numpy": _numpy_state_to_json(state.rng.numpy)},
    }
    try:
        text = json.dumps(doc, indent=1)
    except TypeError as exc:
        raise ValueError(f"TrainerState.extra must be JSON-serialisable: {exc}") from None
    (directory / TRAINER_STATE_FILE).write_text(text)
    tensors = {"torch_cpu": state.rng.torch_cpu.contiguous()}
    tensors.update({f"torch_cuda_{i}": t.contiguous() for i, t in enumerate(state.rng.torch_cuda)})
    save_file(tensors, str(directory / RNG_TENSORS_FILE))


def load_trainer_state(directory: PathLike) -> TrainerState:
    """Read what ``save_trainer_state`` wrote; raises CheckpointError naming the file on any problem."""
    directory = Path(directory)
    path = directory / TRAINER_STATE_FILE
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT_VERSION}")
        version, internal, gauss = doc["rng"]["python"]
        python_state = (version, tuple(internal), gauss)
        numpy_state = _numpy_state_from_json(doc["rng"]["numpy"])
        step, cursor, extra = int(doc["step"]), int(doc["data_cursor"]), dict(doc.get("extra") or {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read trainer state ({exc})") from None
    rng_path = directory / RNG_TENSORS_FILE
    try:
        tensors = load_file(str(rng_path))
        torch_cpu = tensors["torch_cpu"]
    except (OSError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"{rng_path}: cannot read torch RNG state ({exc})") from None
    cuda = tuple(tensors[f"torch_cuda_{i}"] for i in range(len(tensors) - 1) if f"torch_cuda_{i}" in tensors)
    return TrainerState(
        step=step, data_cursor=cursor, extra=extra,
        rng=RngState(python=python_state, numpy=numpy_state, torch_cpu=torch_cpu, torch_cuda=cuda),
    )
