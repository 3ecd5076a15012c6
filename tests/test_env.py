"""core.env's build lock: a process killed while holding it (a learner rank killed mid-build) leaves torch's plain
build-lock file behind, and the next holder removes it instead of waiting on it forever."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import env

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pathlib import Path
from core.env import torch_extensions_lock
root = Path(sys.argv[1])
with torch_extensions_lock(root):
    (root / "op").mkdir(exist_ok=True)
    (root / "op" / "lock").touch()  # torch's FileBaton, as a build in progress holds it
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def own_root(tmp_path, monkeypatch) -> Path:
    """An extensions folder that counts as the project's own."""
    monkeypatch.setitem(env.OFFLINE_ENV, "TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    return tmp_path / "torch_extensions"


def test_a_killed_builder_s_lock_is_removed_by_the_next_holder(own_root):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(own_root)], stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()  # SIGKILL mid-build: no clean-up runs, the kernel drops the flock
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert (own_root / "op" / "lock").exists()
    start = time.monotonic()
    with env.torch_extensions_lock(own_root):
        assert not (own_root / "op" / "lock").exists()
    assert time.monotonic() - start < 10


def test_the_lock_waits_for_a_live_holder(own_root):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(own_root)], stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen([sys.executable, "-c",
                                   "import sys; from pathlib import Path; from core.env import torch_extensions_lock\n"
                                   "with torch_extensions_lock(Path(sys.argv[1])): print('got', flush=True)",
                                   str(own_root)], stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT)})
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=2)  # the live holder's build is not interrupted
        holder.kill()
        out, _ = waiter.communicate(timeout=30)
        assert out.strip() == "got"
    finally:
        holder.kill()


def test_a_folder_that_is_not_the_project_s_is_never_cleaned(tmp_path, own_root):
    other = tmp_path / "elsewhere"
    (other / "op").mkdir(parents=True)
    (other / "op" / "lock").touch()
    with env.torch_extensions_lock(other):
        assert (other / "op" / "lock").exists()


def test_two_learner_ranks_join_their_group_while_the_op_is_built_under_the_lock(free_port):
    """learner.engine.init_distributed builds DeepSpeed's op under the lock and joins the group outside it: a rank
    that held the lock through the rendezvous would wait there for a rank waiting on the lock (a deadlock)."""
    port = free_port()
    code = ("from learner.engine import init_distributed; import torch.distributed as dist\n"
            "init_distributed('gloo', timeout_s=120); dist.barrier(); print('joined', dist.get_rank(), flush=True)")
    ranks = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [o.strip().splitlines()[-1:] for o, _ in outs] == [["joined 0"], ["joined 1"]], [e[-2000:] for _, e in outs]
