"""The GRPO driver in-process on a real local Ray cluster: one step end to end, TensorBoard scalars, text and
images judged by rewards of their own, and checkpoint -> resume with the same step, data cursor and weights.
(Killed, hung and lost actors mid-step: tests/test_chaos.py, against a fault-free run to the last bit.)

One run, built up by module-scoped fixtures, each the state it names and each depending on the one before:
trainer -> stepped -> split_rewards_step -> checkpointed -> resumed -> resumed_stepped -> evaluated. Each fixture
does its step and records what its test checks at that moment, so any test run alone (or in any order) gets the
same state as in the full file, and the file does each step once. The first trainer is torn down by ``resumed``
(as a crash would), so every step on it is a fixture that ``checkpointed`` depends on; the hung learner rank ends
the resumed run, so its test requests the last fixture on that run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from actors.hf_engine import hf_param_name
from core import checkpoint as ckpt
from core.config import load_config
from rl.monitor import read_scalars

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
B, G = 2, 4

EXPECTED_SCALARS = [
    "reward/format/mean", "reward/degradation/mean", "reward/understanding/mean", "reward/generation/mean",
    "reward/total/mean", "reward/total/group_std", "grpo/advantage_mean", "grpo/advantage_std",
    "grpo/filtered_groups", "learner/text_loss", "learner/image_loss", "learner/text_clip_fraction",
    "learner/policy_grad_norm", "learner/diffusion_grad_norm", "learner/policy_lr", "policy/version",
    "timing/rollout", "timing/reward", "timing/wait", "timing/learner", "timing/sync", "timing/step",
    "throughput/samples_per_s", "async/staleness", "async/staleness_max", "learner/staleness_max",
    "learner/off_policy_chains", "learner/dropped_stale_chains", "learner/engine_logp_gap",
    "learner/engine_ratio_mean", "learner/engine_clip_fraction",
]


def _config(tmp: Path, models: dict, *extra: str):
    return load_config(ROOT / "configs/grpo_random_local.yaml", [
        f"output_dir={tmp}/run", f"policy.path={models['policy']}", f"diffusion.path={models['diffusion']}",
        "policy.bootstrap=false", "diffusion.bootstrap=false", f"grpo.prompts_per_step={B}",
        f"grpo.group_size={G}", "trainer.total_steps=4", "trainer.image_every=1", "trainer.progress_bar=false",
        "chain.max_stage_tokens=16", "diffusion.num_steps=4",
        *extra,
    ])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_models, ray_local) -> dict:
    """A fresh GRPOTrainer at step 0, with its config, output folder and models."""
    from rl.trainer import GRPOTrainer

    tmp = tmp_path_factory.mktemp("trainer")
    cfg = _config(tmp, tiny_models)
    return {"tmp": tmp, "models": tiny_models, "trainer": GRPOTrainer(cfg), "cfg": cfg}


@pytest.fixture(scope="module")
def stepped(trainer) -> dict:
    """The fresh trainer's first step: its metrics, step and cursor, and the TensorBoard scalars after it."""
    run = trainer["trainer"]
    metrics = run.step()
    state = {"trainer": run, "metrics": metrics, "step_id": run.step_id, "cursor": run.cursor}
    run.monitor.flush()
    state["scalars"] = read_scalars(trainer["cfg"].trainer.log_dir)
    return state


@pytest.fixture(scope="module")
def split_rewards_step(stepped) -> dict:
    """One step with the text and the images judged by rewards of their own (grpo.text_rewards /
    image_rewards / section_rewards), set back afterwards: its metrics."""
    run = stepped["trainer"]
    g = run.cfg.grpo
    g.text_rewards, g.image_rewards = ["format", "understanding"], ["generation"]
    g.section_rewards = {"degradation": ["format", "degradation"]}  # the driver's columns (the learner's
    try:  # credit rule stays chain here: section credit at the learner is tests/test_grpo.py's)
        metrics = run.step()
    finally:
        g.text_rewards = g.image_rewards = g.section_rewards = None
    return {"trainer": run, "metrics": metrics}


@pytest.fixture(scope="module")
def checkpointed(trainer, split_rewards_step) -> dict:
    """A checkpoint of the first trainer after all its steps: the path, the latest complete checkpoint right
    after saving, the step and cursor it holds, and the exported policy weights."""
    run = split_rewards_step["trainer"]
    path = run.save_checkpoint()
    return {"trainer": run, "path": path,
            "latest": ckpt.latest_complete(Path(trainer["cfg"].trainer.checkpoint_dir)),
            "step": run.step_id, "cursor": run.cursor,
            "saved": load_file(str(next((path / "export" / "policy").glob("*.safetensors"))))}


@pytest.fixture(scope="module")
def resumed(trainer, checkpointed) -> dict:
    """The first trainer torn down, as a crash would, and the run resumed from ``checkpointed`` in a fresh set
    of actors, with one prompt a step and a held-out evaluation every 2 steps (a resume may change the batch):
    its step and cursor and the learner's policy weights as loaded, before any step."""
    old = checkpointed["trainer"]
    old.rollouts.shutdown()
    old.learner.shutdown()
    old.rewards.shutdown()
    from rl.trainer import GRPOTrainer

    step = checkpointed["step"]
    run = GRPOTrainer(_config(trainer["tmp"], trainer["models"], "trainer.resume=true",
                              "grpo.prompts_per_step=1", "grpo.filter_zero_variance=false",
                              f"trainer.eval_every={step + 2}", "trainer.eval_images=1",
                              "trainer.eval_panel.full_reference=[{name: gmsd, lower_better: true}, {name: fsim}]"))
    return {"trainer": run, "step_id": run.step_id, "cursor": run.cursor,
            "live": run.learner.gather_full_state("policy")}


@pytest.fixture(scope="module")
def resumed_stepped(resumed) -> dict:
    """The resumed run's first step (it trains on from the checkpoint): its metrics, step and cursor."""
    run = resumed["trainer"]
    metrics = run.step()
    return {"trainer": run, "metrics": metrics, "step_id": run.step_id, "cursor": run.cursor}


@pytest.fixture(scope="module")
def evaluated(resumed_stepped) -> dict:
    """The resumed run's second step, its first with a held-out evaluation: its metrics and step, and the
    TensorBoard scalars after it."""
    run = resumed_stepped["trainer"]
    metrics = run.step()
    state = {"trainer": run, "metrics": metrics, "step_id": run.step_id}
    run.monitor.flush()
    state["scalars"] = read_scalars(run.cfg.trainer.log_dir)
    return state


def test_one_step_logs_every_scalar(stepped):
    metrics, scalars = stepped["metrics"], stepped["scalars"]
    assert stepped["step_id"] == 1 and stepped["cursor"] == B
    assert 0.0 <= metrics["reward/total/mean"] <= 4.0
    if metrics["grpo/kept_chains"] > 0:
        missing = [k for k in EXPECTED_SCALARS if k not in scalars]
    else:  # every group had equal rewards: no update, so no learner scalars this step
        missing = [k for k in EXPECTED_SCALARS if k not in scalars and not k.startswith(("learner/", "timing/l",
                                                                                         "timing/s"))]
    assert not missing, missing
    if metrics["grpo/kept_chains"] > 0:  # vLLM samples, the learner re-scores: the same numbers (fp32 here)
        assert metrics["learner/engine_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert metrics["learner/engine_logp_gap"] < 1e-3 and metrics["learner/engine_clip_fraction"] < 0.02


def test_text_and_images_can_be_judged_by_their_own_rewards(split_rewards_step):
    metrics = split_rewards_step["metrics"]
    # generation differs between any two chains (the SDE sampler's noise), so no group is filtered even when
    # the text rewards tie, and the images' advantages are the generation reward normalised in each group:
    # unit (unbiased) std per group, so sqrt(B (G - 1) / (B G - 1)) over the batch (a little less: grpo.eps is
    # added to each group's std, and the tiny models' generation rewards differ by ~1e-3)
    assert metrics["grpo/filtered_groups"] == 0 and metrics["grpo/kept_chains"] == B * G
    assert metrics["grpo/image_advantage_std"] == pytest.approx((B * (G - 1) / (B * G - 1)) ** 0.5, rel=5e-3)
    assert metrics["learner/diffusion_grad_norm"] > 0
    # the <degradation> section has a column of its own; the other sections share the text's
    assert "grpo/degradation_advantage_std" in metrics
    assert metrics["grpo/rough_understand_advantage_std"] == pytest.approx(metrics["grpo/advantage_std"])


def test_checkpoint_then_resume_restores_step_cursor_and_weights(checkpointed, resumed, resumed_stepped):
    """Resumed with one prompt a step and a held-out evaluation every 2 steps (a resume may change the
    batch): the fixtures after ``resumed`` step the resumed run."""
    path, step, cursor, saved = (checkpointed[k] for k in ("path", "step", "cursor", "saved"))
    assert checkpointed["latest"] == path
    assert resumed["trainer"].cfg.learner.num_ranks == 2
    assert (resumed["step_id"], resumed["cursor"]) == (step, cursor)
    live = resumed["live"]
    assert len(saved) > 0
    for name, tensor in saved.items():  # exported (on-disk) names -> the learner's in-memory names
        assert torch.equal(live[hf_param_name(name)], tensor), name
    metrics = resumed_stepped["metrics"]  # and it trains on from there
    assert resumed_stepped["step_id"] == step + 1 and resumed_stepped["cursor"] == cursor + 1
    assert metrics["policy/version"] >= 1


def test_eval_every_writes_held_out_rewards_at_its_steps_only(evaluated):
    run, metrics, scalars = evaluated["trainer"], evaluated["metrics"], evaluated["scalars"]
    every = run.cfg.trainer.eval_every
    assert evaluated["step_id"] == every  # the first evaluation step after the resume
    assert metrics["eval/chains"] == 1 * G  # eval_images x group_size held-out chains
    for part in ("format", "degradation", "understanding", "generation", "total"):
        assert 0.0 <= metrics[f"eval/reward/{part}/mean"] <= 4.0, part
    assert any(k.startswith("eval/reward/quality/") for k in metrics)  # the image metrics (piqe, psnr, ssim)
    # the held-out-only panel, raw: GMSD (0 = identical to HR) and FSIM (1 = identical), every chain scored
    assert 0.0 < metrics["eval/panel/gmsd"] < 1.0 and 0.0 < metrics["eval/panel/fsim"] < 1.0
    assert metrics["eval/panel/gmsd_failed"] == metrics["eval/panel/fsim_failed"] == 0
    assert [s for s, _ in scalars["eval/reward/total/mean"]] == [every]
    assert [s for s, _ in scalars["reward/total/mean"]][-2:] == [every - 1, every]


def _hang_next_step(worker) -> None:
    """Runs inside a learner rank (``__ray_call__``): its next train step never returns."""
    worker.train_step = lambda *args, **kwargs: time.sleep(3600)


def test_a_hung_learner_rank_is_killed_at_its_deadline_and_the_run_ends_naming_its_checkpoint(trainer, evaluated):
    """Ends the resumed run: it requests ``evaluated``, the last fixture on that run, so every step the other
    tests check is done (and recorded) before the hang, whatever order the tests run in. Rank 1 sleeps in its step
    (rank 0 then waits for it in a collective): both are killed at the learner's deadline; with no healing allowed
    the run ends naming the deadline and its last complete checkpoint (tests/test_chaos.py heals a lost rank)."""
    from rl.run_state import RunFailed

    run = evaluated["trainer"]
    root = Path(trainer["cfg"].trainer.checkpoint_dir)
    before = ckpt.latest_complete(root)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _hang_next_step runs in the actor
    ray.get(run.learner.actors[1].__ray_call__.remote(_hang_next_step))
    run.learner.timeout_s = 10.0  # learner.call_timeout_s (read at start; 1800 by default): 10 s for this call
    run.cfg.trainer.total_steps = run.step_id + 1
    run.cfg.trainer.max_failures = 0  # no healing
    start = time.monotonic()
    with pytest.raises(RunFailed, match=r"did not finish .*learner.call_timeout_s.*last complete checkpoint: .*step_"):
        run.fit()
    assert time.monotonic() - start < 120  # the deadline, not the hour-long sleep
    assert ckpt.latest_complete(root) == before
    ckpt.verify_checkpoint(before)  # every file of the manifest is there, sizes match
