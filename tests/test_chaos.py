"""Faults change nothing: a 6-step run on the embedded default with a rollout actor hung (the watchdog kills it
mid-step, Ray restarts it), a reward actor killed mid-scoring (restarted), every reward actor killed for good, then a
rollout actor and a learner rank killed for good (the run heals itself twice from its step-4 checkpoint, rebuilding
every role), against the same run without faults. The per-step reward scalars and the final weights must be equal
to the last bit (CPU, fp32, synchronous; every chain's sampling is seeded by (step, prompt, sample))."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from core import checkpoint as ckpt
from core.config import load_config
from rl.monitor import read_scalars

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2
HANG_ROLLOUT, KILL_REWARD, LOSE_REWARDS, LOSE_ROLLOUT_AND_LEARNER = 2, 3, 5, 6  # the 1-based steps they hit
RESUMED_AT = 4  # both heals (the reward pool lost at 5, a rollout actor and a learner rank at 6) resume from step 4
ROLLOUT_TIMEOUT_S = 30.0  # a call's silence while the actor is alive (a restart does not count: its clock waits)
REWARD_TIMEOUT_S = 60.0


def _config(out: Path, models: dict):
    return load_config(ROOT / "configs/grpo_random_local.yaml", [
        f"output_dir={out}", f"policy.path={models['policy']}", f"diffusion.path={models['diffusion']}",
        "policy.bootstrap=false", "diffusion.bootstrap=false", "grpo.prompts_per_step=2", "grpo.group_size=4",
        f"trainer.total_steps={STEPS}", f"trainer.checkpoint_every={EVERY}", "trainer.keep_checkpoints=3",
        "trainer.image_every=0", "trainer.progress_bar=false", "trainer.max_failures=2",
        "chain.max_stage_tokens=16", "diffusion.num_steps=4", f"rollout.call_timeout_s={ROLLOUT_TIMEOUT_S}",
        f"reward.call_timeout_s={REWARD_TIMEOUT_S}",
    ])


def _hang_next_rollout(worker) -> None:
    """Runs inside the rollout actor (``__ray_call__``): its next chain sampling never returns."""
    worker.sampler.sample = lambda *args, **kwargs: time.sleep(3600)


def _slow_next_scoring(worker) -> None:
    """Runs inside a reward actor (``__ray_call__``): its scoring waits 2 s first, so the kill lands while it holds
    chains however fast the metrics are (the actor's restart drops the patch)."""
    scorer = worker.scorer

    class Slow:
        def __getattr__(self, name):
            return getattr(scorer, name)

        def __call__(self, *args, **kwargs):
            time.sleep(2.0)
            return scorer(*args, **kwargs)

    worker.scorer = Slow()


class Chaos:
    """Wraps ``trainer.step`` so that each fault hits its step once (a step redone after a recovery runs clean)."""

    def __init__(self, trainer):
        self.trainer, self.done, self.injected_at = trainer, set(), {}
        self._step = trainer.step
        trainer.step = self.step

    def step(self):
        t, step = self.trainer, self.trainer.step_id + 1
        fault = {HANG_ROLLOUT: "hang rollout", KILL_REWARD: "kill reward", LOSE_REWARDS: "lose rewards",
                 LOSE_ROLLOUT_AND_LEARNER: "lose rollout and learner"}.get(step)
        if fault is None or fault in self.done:
            return self._step()
        self.done.add(fault)
        self.injected_at[fault] = time.monotonic()
        if fault == "kill reward":  # while it holds chains (slowed, so that a fast metric cannot finish first)
            original = t.rewards.score
            ray.get(t.rewards.actors[0].__ray_call__.remote(_slow_next_scoring))

            def score_and_kill(refs, samples, timings=None):
                ray.wait(refs, num_returns=len(refs))
                killer = threading.Timer(0.5, lambda: ray.kill(t.rewards.actors[0], no_restart=False))
                killer.start()
                try:
                    return original(refs, samples, timings)
                finally:
                    killer.join()

            t.rewards.score = score_and_kill
            try:
                return self._step()
            finally:
                t.rewards.score = original
        if fault == "hang rollout":
            ray.get(t.rollouts.actors[0].__ray_call__.remote(_hang_next_rollout))
            return self._step()
        if fault == "lose rewards":  # no restarts left: the pool raises ActorLost, the driver rebuilds every role
            for actor in t.rewards.actors:
                ray.kill(actor, no_restart=True)
            return self._step()
        # no restarts left: the step's first call (the rollout) finds its actor gone, and the rebuild must also
        # replace a learner rank the ZeRO group cannot go on without
        ray.kill(t.rollouts.actors[0], no_restart=True)
        ray.kill(t.learner.actors[1], no_restart=True)
        return self._step()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    export = ckpt.latest_complete(run / "checkpoints") / "export"
    out = {}
    for f in sorted(export.rglob("*.safetensors")):
        out.update({f"{f.relative_to(export)}:{k}": v for k, v in load_file(f).items()})
    return out


def _shutdown(trainer) -> None:
    for group in (trainer.rollouts, trainer.learner, trainer.rewards):
        group.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, ray_local):
    from rl.trainer import GRPOTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _hang_next_rollout, _slow_next_scoring run in actors
    tmp = tmp_path_factory.mktemp("chaos")
    out = {}
    for name in ("clean", "faults"):
        trainer = GRPOTrainer(_config(tmp / name, tiny_models))
        chaos = Chaos(trainer) if name == "faults" else None
        start = time.monotonic()
        trainer.fit()
        out[name] = {"dir": tmp / name, "seconds": time.monotonic() - start, "faults": trainer.faults,
                     "chaos": chaos, "scalars": read_scalars(tmp / name / "tensorboard")}
        _shutdown(trainer)
    return out


def test_every_fault_was_injected_and_the_run_finished(runs):
    faulted = runs["faults"]
    assert faulted["chaos"].done == {"hang rollout", "kill reward", "lose rewards", "lose rollout and learner"}
    assert ckpt.load_trainer_state(ckpt.latest_complete(faulted["dir"] / "checkpoints")).step == STEPS
    lost, fault = faulted["faults"]  # actors past their restarts need the driver
    assert lost.error.startswith("ActorLost") and (lost.step, lost.resumed_at, lost.steps_redone) == (
        LOSE_REWARDS, RESUMED_AT, 0)
    assert (fault.step, fault.resumed_at, fault.steps_redone) == (
        LOSE_ROLLOUT_AND_LEARNER, RESUMED_AT, LOSE_ROLLOUT_AND_LEARNER - 1 - RESUMED_AT)
    assert "rollout" in fault.error.lower(), fault.error  # the rollout actor is the first the step calls
    s = faulted["scalars"]
    assert s["faults/recoveries"][-1] == (RESUMED_AT + 1, 2.0) and s["faults/steps_redone"][-1] == (RESUMED_AT + 1, 1.0)
    assert dict(s["faults/hung_actors_killed"])[HANG_ROLLOUT] == 1.0  # the watchdog, not the hour-long sleep
    assert dict(s["reward/reissued_chains"])[KILL_REWARD] > 0
    print({k: f"{v:.1f} s" for k, v in (("clean", runs["clean"]["seconds"]), ("faults", faulted["seconds"]),
                                         ("recovery", fault.seconds))})


def test_reward_scalars_equal_the_fault_free_run_bit_for_bit(runs):
    clean, faulted = runs["clean"]["scalars"], runs["faults"]["scalars"]
    tags = sorted(t for t in clean if t.startswith(("reward/", "grpo/", "learner/"))
                  and t not in ("reward/reissued_chains", "learner/seconds") and not t.endswith("_s"))  # no counts, times
    assert "reward/total/mean" in tags and "learner/text_loss" in tags
    for tag in tags:
        assert [s for s, _ in faulted[tag]] == [s for s, _ in clean[tag]], tag  # one point a step, redone ones replaced
        assert faulted[tag] == clean[tag], tag


def test_final_weights_equal_the_fault_free_run_bit_for_bit(runs):
    clean, faulted = _weights(runs["clean"]["dir"]), _weights(runs["faults"]["dir"])
    assert clean.keys() == faulted.keys() and len(clean) > 10
    differ = [k for k in clean if not torch.equal(clean[k], faulted[k])]
    assert not differ, differ[:5]
