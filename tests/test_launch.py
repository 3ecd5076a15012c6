"""``python -m rl.launch`` as a user runs it: a bad config exits with a clear message; a missing cold start is made
first, and the run after it (which listens on 127.0.0.1 only), killed while a checkpoint is half written, resumes
from the previous complete one when the same command is submitted with ``ray job submit`` to a real head."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from core import checkpoint as ckpt
from core.config import cold_start_pending, load_config
from rl.monitor import read_scalars

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY = str(Path(sys.executable).parent / "ray")
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}  # the second: 127.0.0.1 as an IPv6 (dual-stack) socket shows it


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


def _overrides(out: Path, models: dict, *extra: str) -> list[str]:
    return [
        f"output_dir={out}", f"policy.path={models['policy']}", f"diffusion.path={models['diffusion']}",
        "trainer.progress_bar=false", "chain.max_stage_tokens=16", "diffusion.num_steps=4", *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    # as a user with the project's venv activated: `python` and `ray` are the venv's
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PATH=path, **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def test_bad_config_exits_2_naming_the_key(tmp_path):
    out = subprocess.run([PY, "-m", "rl.launch", "configs/grpo_random_local.yaml", "grpo.group_size=1"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "grpo.group_size" in out.stderr and "= 1" in out.stderr


def _listening_sockets(pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process title) of every listening TCP socket of process ``pid`` and its descendants."""
    import psutil

    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline())[:80]
            found |= {(c.laddr.ip, c.laddr.port, title) for c in proc.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # a process that ended meanwhile
    return found


def _cold_start_config(tmp: Path, out: Path, models: dict) -> Path:
    """configs/sft_local.yaml as a 1-step cold start into ``out`` on the test's tiny models."""
    sft_yaml = (ROOT / "configs/sft_local.yaml").read_text()
    for old, new in (("output_dir: runs/${name}", f"output_dir: {out}"), ("total_steps: 300", "total_steps: 1"),
                     ("checkpoint_every: 100", "checkpoint_every: 1"), ("path: .models/tiny/policy",
                     f"path: {models['policy']}"), ("path: .models/tiny/diffusion", f"path: {models['diffusion']}")):
        assert old in sft_yaml, old
        sft_yaml = sft_yaml.replace(old, new)
    (tmp / "sft.yaml").write_text(sft_yaml + "  progress_bar: false\n")
    return tmp / "sft.yaml"


@contextlib.contextmanager
def _local_head(env: dict[str, str], free_port):
    """``ray start --head`` on 127.0.0.1 with its own ports and temp dir; yields the job server's address once
    ``ray job list`` answers, and stops the head afterwards."""
    port, dash, agent, agent_grpc = free_port(), free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # own agent ports: another Ray on this machine may hold the defaults (52365), and then jobs never start
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}", "--include-dashboard=true", "--num-cpus=4",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:  # the job server is up once `ray job list` answers
            if subprocess.run([RAY, "job", "list", f"--address={address}"], env=env,
                              capture_output=True).returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        else:
            pytest.fail(f"the Ray head at {address} did not answer within 120 s")
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, env: dict[str, str], entrypoint: list[str]) -> subprocess.CompletedProcess:
    submit = [RAY, "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--", *entrypoint]
    for _ in range(90):  # the job agent registers a few seconds (more on a loaded machine) after the dashboard,
        # and a loaded machine's dashboard can miss the CLI's connection check (made before anything is submitted)
        job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
        if "No available agent" not in job.stderr and "Failed to connect to Ray" not in job.stderr:
            return job
        time.sleep(2)
    return job


@pytest.mark.slow
def test_a_cold_start_then_a_run_killed_mid_checkpoint_resumes_by_ray_job_submit(tmp_path, models, free_port):
    """The config names a cold start not made yet: the first launch (its own local Ray cluster) runs the SFT config
    first (once) and starts GRPO from its export; that run is killed (driver and cluster) while step 2's checkpoint
    is half written. The same command, submitted with ``ray job submit`` to a head on 127.0.0.1 with Ray's token
    auth (as on the cluster), goes straight to GRPO and resumes from step 1."""
    out, sft_out = tmp_path / "run", tmp_path / "sft"
    root, export = out / "checkpoints", sft_out / "checkpoints/step_000001/export"
    command = ["-m", "rl.launch", "configs/grpo_random_local.yaml",
               *_overrides(out, models, "trainer.total_steps=2", "trainer.checkpoint_every=1",
                           "learner.num_ranks=1", "reward.num_actors=1",  # the fewest processes: resume is the point
                           f"cold_start={_cold_start_config(tmp_path, sft_out, models)}",
                           f"policy.init_from={export}/policy", f"diffusion.init_from={export}/diffusion")]
    assert cold_start_pending(load_config(ROOT / "configs/grpo_random_local.yaml", command[3:]))
    console = tmp_path / "first.console"
    with console.open("w") as sink:
        proc = subprocess.Popen([PY, *command], cwd=ROOT, env=_env(REALSR_FAULT_CHECKPOINT_PAUSE="2:600"),
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # wait until step 2's checkpoint is written but not committed
            half = [p for p in root.glob(".tmp-step_000002-*") if (p / "trainer_state.json").exists()]
            if half:
                listening = _listening_sockets(proc.pid)  # every process of the run is alive, paused
                break
            assert proc.poll() is None, "the run ended before its second checkpoint:\n" + console.read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("no half-written checkpoint of step 2 appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run: driver and its local Ray cluster
        proc.wait(timeout=60)
    first = console.read_text()
    assert "cold start:" in first and "running" in first
    assert (export / "policy/config.json").is_file() and (export / "diffusion/model_index.json").is_file()
    for model in ("policy", "diffusion"):  # the run's models are copies of the cold start's export
        assert (out / "init" / model / ".init_from").read_text() == str((export / model).resolve())
    assert ckpt.latest_complete(root).name == "step_000001"  # the half-written one is never picked
    # a local run listens on 127.0.0.1 only: Ray's processes, and the learner's rendezvous store
    assert listening and {ip for ip, _, _ in listening} <= LOOPBACK, sorted(listening)
    assert any("LearnerWorker" in owner for _, _, owner in listening), sorted(listening)
    # a quiet console: the run's own lines on the terminal, the actors' and libraries' output in run.log
    run_log = (out / "run.log").read_text()
    for noise in ("(RolloutWorker pid=", "(LearnerWorker pid=", "(RewardWorker pid=", "DeepSpeed"):
        assert noise not in first, noise
    assert "(RolloutWorker pid=" in run_log and "(LearnerWorker pid=" in run_log
    assert "checkpoint " in first and "checkpoint " in run_log  # the run's own lines are in the log too

    # made once: the same command finds the export, goes straight to GRPO and resumes, now as a Ray job
    assert not cold_start_pending(load_config(ROOT / "configs/grpo_random_local.yaml", command[3:]))
    # Ray's token auth, as on the cluster: the head, the CLI and the job's driver share one token
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    with _local_head(env, free_port) as address:
        wrong = subprocess.run([RAY, "job", "list", f"--address={address}"], capture_output=True,
                               env={**env, "RAY_AUTH_TOKEN": secrets.token_hex(16)})
        assert wrong.returncode != 0  # the job server refuses another token
        job = _submit(address, env, ["python", *command, "trainer.resume=auto"])
    said = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in job.stdout.lower(), said[-6000:]
    assert "joining Ray cluster" in said and "cold start:" not in said
    assert "resumed from" in said and "step_000001 at step 1" in said
    assert "its process is gone" in said  # the killed run's run.lock named and taken over
    state = ckpt.load_trainer_state(ckpt.latest_complete(root))
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml")
    assert state.step == 2 and state.data_cursor == 2 * cfg.grpo.prompts_per_step
    steps = [s for s, _ in read_scalars(out / "tensorboard")["policy/version"]]
    assert 2 in steps
    assert ckpt.latest_complete(sft_out / "checkpoints").name == "step_000001"
