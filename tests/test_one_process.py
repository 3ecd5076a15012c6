"""rl.one_process: rl.launch's drivers over the local transport, without Ray (the GPU check's path), from the same
configs: an SFT export that a GRPO run starts from, both models through LoRA with image branches and stage credit,
held-out metrics and the panel in TensorBoard, the new weights loaded into the sampler after each update, and a resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import checkpoint as ckpt
from core.config import ConfigError, load_config
from rl.monitor import read_scalars
from rl.local_roles import LocalTransport
from rl.one_process import fit

ROOT = Path(__file__).resolve().parents[1]


def _models(small_models) -> list[str]:
    return [f"policy.path={small_models['policy']}", f"diffusion.path={small_models['diffusion']}",
            "policy.bootstrap=false", "diffusion.bootstrap=false"]


@pytest.mark.parametrize("override, key", [
    ("trainer.max_staleness=1", "trainer.max_staleness"),
    ("learner.num_ranks=2", "learner.num_ranks"),
])
def test_what_needs_several_processes_is_an_error_naming_the_key(override, key):
    overrides = ["learner.num_ranks=1", override] if key != "learner.num_ranks" else [override]
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", overrides)
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        LocalTransport().check(cfg)


@pytest.mark.slow
def test_cold_start_then_grpo_in_one_process(small_models, tmp_path, free_port):
    sft = load_config(ROOT / "configs/sft_local.yaml", [
        *_models(small_models), f"output_dir={tmp_path}/sft", "learner.num_ranks=1", "sft.batch_size=2",
        "trainer.total_steps=2", "trainer.progress_bar=false"])
    export = fit(sft, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    assert (export / "policy" / "config.json").is_file() and (export / "diffusion" / "model_index.json").is_file()
    assert read_scalars(tmp_path / "sft" / "tensorboard")["sft/text_loss"][-1][0] == 2

    grpo_args = [
        *_models(small_models), f"output_dir={tmp_path}/grpo", "cold_start=null",
        f"policy.init_from={export}/policy", f"diffusion.init_from={export}/diffusion",
        "learner.num_ranks=1", "learner.micro_batch_size=2", "rollout.engine=hf", "chain.max_stage_tokens=8",
        "grpo.prompts_per_step=1", "grpo.group_size=2", "grpo.image_group_size=2",
        "grpo.decoupled_normalization=true", "grpo.image_credit={name: stage}",
        "reward.stage_metrics=[{name: psnr, weight: 1.0, scale: 40.0}]", "trainer.total_steps=2", "trainer.eval_every=2",
        "trainer.eval_images=1", "trainer.checkpoint_every=2", "trainer.progress_bar=false",
        "diffusion.num_steps=2", "diffusion.train_steps_fraction=0.5", "diffusion.train_steps_start=0.5"]
    final = fit(load_config(ROOT / "configs/grpo_local.yaml", grpo_args))
    scalars = read_scalars(tmp_path / "grpo" / "tensorboard")
    assert [s for s, _ in scalars["reward/total/mean"]] == [1, 2]
    assert [s for s, _ in scalars["eval/panel/psnry"]] == [0, 2] and scalars["eval/chains"][0][1] == 2
    # stage credit: the rough and middle images scored against the HR at their size, each with its own advantage
    assert all(0 < v < 1 for stage in ("rough", "middle") for _, v in scalars[f"reward/generation/{stage}/mean"])
    assert all(v > 0 for stage in ("rough", "middle") for _, v in scalars[f"grpo/{stage}_image_advantage_std"])
    trained = [v for _, v in scalars.get("policy/version", [])]
    assert trained and trained[-1] >= 1  # at least one update reached the sampler
    ratios = scalars.get("learner/image_first_epoch_ratio_mean", [])
    assert all(abs(v - 1.0) < 1e-3 for _, v in ratios)  # the on-policy check held in one process too
    assert (final / "policy_adapter").is_dir() and (final / "diffusion_adapter").is_dir()

    # the local transport honours trainer.resume: one more step from the step-2 checkpoint, not from the start
    fit(load_config(ROOT / "configs/grpo_local.yaml", [*grpo_args, "trainer.total_steps=3", "trainer.resume=true"]))
    steps = [s for s, _ in read_scalars(tmp_path / "grpo" / "tensorboard")["reward/total/mean"]]
    assert steps[-1] == 3 and steps.count(1) == 1  # step 3 written, steps 1-2 not redone


def _weights(run: Path) -> dict:
    """Both models' exported weights at the run's latest complete checkpoint."""
    export = ckpt.latest_complete(run / "checkpoints") / "export"
    return {f"{m}/{f.relative_to(export / m)}": t for m in ("policy", "diffusion")
            for f in sorted((export / m).rglob("*.safetensors")) for t in [load_file(f)]}


@pytest.mark.slow
def test_sigterm_ends_the_step_with_a_checkpoint_and_exit_0_and_a_resume_ends_where_an_unstopped_run_does(
        small_models, tmp_path):
    """Preemption: SIGTERM as step 2 starts (sent by the driver to itself, through the real handler); step 2
    finishes, its checkpoint is written, the process exits 0 naming the resume; ``resume=auto`` then makes step 3,
    and the final weights equal those of a run that was never stopped."""
    args = [*_models(small_models), "learner.num_ranks=1", "learner.micro_batch_size=2", "rollout.engine=hf",
            "chain.max_stage_tokens=8", "grpo.prompts_per_step=1", "grpo.group_size=2", "diffusion.num_steps=2",
            "trainer.total_steps=3", "trainer.checkpoint_every=3", "trainer.progress_bar=false"]

    def run(out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rl.one_process", "configs/grpo_random_local.yaml",
                               f"output_dir={out}", *args, *extra], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=900)

    stopped = run(tmp_path / "stopped", REALSR_FAULT_SIGTERM_AT_STEP="2")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "SIGTERM received" in stopped.stderr and "stopped at step 2 of 3" in stopped.stderr
    assert "trainer.resume=auto" in stopped.stderr
    assert ckpt.latest_complete(tmp_path / "stopped" / "checkpoints").name == "step_000002"
    resumed = run(tmp_path / "stopped", "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    unstopped = run(tmp_path / "unstopped")
    assert unstopped.returncode == 0, unstopped.stderr[-3000:]
    final, want = _weights(tmp_path / "stopped"), _weights(tmp_path / "unstopped")
    assert ckpt.latest_complete(tmp_path / "stopped" / "checkpoints").name == "step_000003"
    assert final.keys() == want.keys() and final
    for name in want:
        assert all(torch.equal(final[name][k], want[name][k]) for k in want[name]), name
