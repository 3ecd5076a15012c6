"""Process environment for every role (driver, rollout, reward, learner), set before heavy imports.

Offline by construction: weights come from local paths, so any hub access is a bug and must fail fast.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("REALSR_CACHE", Path.home() / ".cache" / "realsr-r1-rl"))

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # DeepSpeed JIT-compiles a comm op on first use (~40 s); keep it across runs.
    "TORCH_EXTENSIONS_DIR": str(CACHE_DIR / "torch_extensions"),
}


def worker_env(code_path: bool = True) -> dict[str, str]:
    """Variables every Ray worker gets (runtime_env env_vars): offline flags, caches, and the code path.

    ``code_path=False`` on a cluster joined through ``ray job submit --working-dir``: Ray ships the code to
    every node itself, and this driver's path would be wrong on the others.
    """
    env = {k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}
    if not code_path:
        return env
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        path = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    env["PYTHONPATH"] = path
    return env


def configure_process(num_cpus: float | None = None) -> None:
    """Apply the offline environment to this process (idempotent; explicit user settings win).

    ``num_cpus``: the CPUs Ray granted this actor. On CPU, torch threads are capped to it (at least 1): on a
    shared 2-core machine, two actors with 2 threads each ran 10-100x slower than with 1 thread each.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # the venv's tools first (as `activate` does): torch builds extensions with the first ninja on PATH, and two
    # ninjas (the venv's, the system's) hash the same build differently, so each rebuilt what the other had built
    tools = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != tools:
        os.environ["PATH"] = os.pathsep.join(p for p in (tools, os.environ.get("PATH", "")) if p)
    if num_cpus is not None:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(num_cpus)))


@contextmanager
def torch_extensions_lock(root: Path | None = None) -> Iterator[None]:
    """Hold the machine-wide lock on the JIT-built torch extensions (DeepSpeed builds its CPU comm op on first use).

    torch's own build lock is a plain file: a process killed while building (a learner rank killed by a fault or a
    timeout) leaves it behind, and every later process on the machine waits on it forever. This lock is an flock,
    which the kernel drops when its holder dies, so its holder knows a torch lock left in our extensions folder is
    stale and removes it. ``root``: the folder (default TORCH_EXTENSIONS_DIR); a folder that is not this project's
    own is only serialised, never cleaned, since other programs may be building there.
    """
    own = Path(OFFLINE_ENV["TORCH_EXTENSIONS_DIR"])
    root = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR", own))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".realsr-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if root.resolve() == own.resolve():
                for stale in root.glob("*/lock"):
                    log.warning("%s: a build lock left by a killed process; removing it", stale)
                    stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
