"""The driver's healing and resume rules without a cluster: ``run_steps`` around a trainer whose steps fail on cue
(a stand-in for the GRPO driver, the code under test is the loop), ``trainer.resume`` at every boundary, and the
clock that tells a hung actor from a busy one."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError

from core import checkpoint as ckpt
from core.actor_group import ProgressClock
from core.faults import ActorLost
from rl import run_state
from rl.local_roles import LocalTransport
from rl.run_state import RunFailed
from rl.transport import RayTransport


class FakeMonitor:
    def __init__(self):
        self.points, self.rewinds = [], []

    def scalars(self, step, metrics):
        self.points += [(step, k, v) for k, v in metrics.items()]

    def rewind(self, step):
        self.rewinds.append(step)
        self.points = [p for p in self.points if p[0] <= step]

    def progress(self, step, postfix):
        pass

    def close(self):
        pass


class FlakyTrainer:
    """Steps that raise a RayActorError at the 1-based steps in ``fail_at`` (once each); a checkpoint every
    ``every`` steps kept in memory; ``recover`` goes back to the latest one."""

    def __init__(self, root: Path, total: int, every: int, max_failures: int, fail_at=(), resume=False,
                 transport=None, max_skipped_steps=3):
        self.transport = transport or RayTransport()
        self.cfg = SimpleNamespace(trainer=SimpleNamespace(total_steps=total, checkpoint_every=every,
                                                           max_failures=max_failures, resume=resume,
                                                           max_skipped_steps=max_skipped_steps))
        self.ckpt_root, self.monitor, self.step_id = root, FakeMonitor(), 0
        self.fail_at, self.saved, self.ran, self.recovered = set(fail_at), [0], [], 0

    def step(self):
        step = self.step_id + 1
        if step in self.fail_at:
            self.fail_at.discard(step)
            raise RayActorError()
        self.ran.append(step)
        self.step_id = step
        self.monitor.scalars(step, {"reward/total/mean": float(step)})
        return {}

    def save_checkpoint(self):
        self.saved.append(self.step_id)

    def roles(self):
        return getattr(self, "live_roles", [])

    def recover(self):
        self.recovered += 1
        self.step_id = self.saved[-1]


def test_a_lost_learner_is_healed_from_the_latest_checkpoint_and_the_steps_after_it_redone(tmp_path):
    t = FlakyTrainer(tmp_path, total=10, every=4, max_failures=2, fail_at={6, 9})
    run_state.run_steps(t, {})
    assert t.ran == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10]  # 6 failed: back to 4, step 5 redone; 9 failed: back to 8
    assert [(f.step, f.resumed_at, f.steps_redone) for f in t.faults] == [(6, 4, 1), (9, 8, 0)]
    assert t.monitor.rewinds == [4, 8]
    rewards = [(s, v) for s, k, v in t.monitor.points if k == "reward/total/mean"]
    assert rewards == [(s, float(s)) for s in range(1, 11)]  # one point a step: the redone ones replaced
    assert [(s, v) for s, k, v in t.monitor.points if k == "faults/recoveries"] == [(5, 1.0), (9, 2.0)]


def test_one_failure_more_than_max_failures_ends_the_run_naming_the_checkpoint(tmp_path):
    t = FlakyTrainer(tmp_path, total=10, every=4, max_failures=1, fail_at={3, 6})
    with pytest.raises(RunFailed, match="step 6 failed: RayActorError.*last complete checkpoint: none"):
        run_state.run_steps(t, {})
    assert t.recovered == 1 and t.step_id == 5
    t0 = FlakyTrainer(tmp_path, total=3, every=0, max_failures=0, fail_at={2})
    with pytest.raises(RunFailed):
        run_state.run_steps(t0, {})
    assert t0.recovered == 0


class BrokenStepTrainer(FlakyTrainer):
    """Step ``broken`` raises ``error`` every time it runs (what a bug inside an actor looks like to the driver)."""

    def __init__(self, root: Path, broken: int, error: BaseException, **kw):
        super().__init__(root, **kw)
        self.broken, self.error = broken, error

    def step(self):
        if self.step_id + 1 == self.broken:
            raise self.error
        return super().step()


def test_the_same_error_at_the_same_step_after_a_rebuild_ends_the_run_without_more_rebuilds(tmp_path, caplog):
    t = BrokenStepTrainer(tmp_path, 3, RayActorError(), total=6, every=1, max_failures=5)
    with pytest.raises(RunFailed, match="step 3 failed: RayActorError"):
        run_state.run_steps(t, {})
    assert t.recovered == 1 and "not a lost actor" in caplog.text  # one rebuild, not five


class Role:
    """A role group whose actors ``lost`` the cluster no longer reports alive."""

    def __init__(self, lost=()):
        self.lost = list(lost)

    def lost_actors(self):
        return self.lost


def _actor_raised(error: BaseException) -> BaseException:
    """What the driver gets when an actor's method raises ``error``: Ray's RayTaskError that is also an ``error``."""
    from ray.exceptions import RayTaskError

    return RayTaskError("LearnerWorker.train_chains", "Traceback ...", error).as_instanceof_cause()


def test_an_error_an_actors_code_raised_with_every_actor_alive_ends_the_run_at_once(tmp_path, caplog):
    transport = RayTransport()
    transport.death_grace_s = 0.2
    t = BrokenStepTrainer(tmp_path, 3, _actor_raised(ValueError("loss is broken")), total=6, every=1,
                          max_failures=5, transport=transport)
    t.live_roles = [Role(), Role()]
    with pytest.raises(RunFailed, match="step 3 failed: .*ValueError.*last complete checkpoint"):
        run_state.run_steps(t, {})
    assert t.recovered == 0 and "not a lost actor" in caplog.text


def test_an_actors_error_while_another_actor_is_gone_is_healed(tmp_path):
    """A learner rank sees its peer's death as a collective error raised by its own code: a lost actor."""
    transport = RayTransport()
    transport.death_grace_s = 0.2
    t = BrokenStepTrainer(tmp_path, 3, _actor_raised(RuntimeError("gloo: connection closed by peer")), total=4,
                          every=1, max_failures=1, transport=transport)
    t.live_roles = [Role(), Role(lost=[1])]
    t.step = lambda: FlakyTrainer.step(t) if t.recovered else BrokenStepTrainer.step(t)  # lost once
    run_state.run_steps(t, {})
    assert t.recovered == 1 and t.ran == [1, 2, 3, 4]


def test_what_counts_as_a_lost_actor():
    from core.weight_broadcast import SyncGroupError

    transport = RayTransport()
    transport.death_grace_s = 0.2
    alive, gone = [Role()], [Role(lost=[0])]
    for lost in (RayActorError(), ActorLost("all reward actors are dead"), SyncGroupError("sync timed out"),
                 _actor_raised(ActorLost("the rollout actor is gone"))):
        assert transport.is_lost(lost, alive), lost
    for error in (_actor_raised(ValueError("bad shard")), _actor_raised(OSError(28, "No space left on device"))):
        assert not transport.is_lost(error, alive) and transport.is_lost(error, gone)
    assert not transport.is_lost(ValueError("a driver bug"), gone)
    assert not LocalTransport().is_lost(RayActorError(), gone)


def test_every_reward_actor_lost_is_healed_like_a_dead_learner_rank(tmp_path):
    t = BrokenStepTrainer(tmp_path, 3, ActorLost("all 2 reward actors are dead"), total=4, every=1,
                          max_failures=1)
    t.step = lambda: FlakyTrainer.step(t) if t.recovered else BrokenStepTrainer.step(t)  # lost once
    run_state.run_steps(t, {})
    assert t.recovered == 1 and t.ran == [1, 2, 3, 4] and t.faults[0].error.startswith("ActorLost")


def test_in_one_process_there_is_no_actor_to_heal_and_an_error_ends_the_run_at_once(tmp_path):
    t = FlakyTrainer(tmp_path, total=5, every=1, max_failures=3, fail_at={3}, transport=LocalTransport())
    with pytest.raises(RayActorError):  # the local transport's lost-actor errors: none
        run_state.run_steps(t, {})
    assert t.recovered == 0 and t.ran == [1, 2]


class SkippingTrainer(FlakyTrainer):
    """The learner skips its update (a non-finite gradient) at the 1-based steps in ``skip_at``."""

    def __init__(self, root: Path, skip_at, **kw):
        super().__init__(root, **kw)
        self.skip_at = set(skip_at)

    def step(self):
        super().step()
        return {"learner/skipped_updates": 2.0 if self.step_id in self.skip_at else 0.0}


def test_consecutive_skipped_updates_end_the_run_naming_the_step(tmp_path, caplog):
    t = SkippingTrainer(tmp_path, {2, 4, 5, 6, 7}, total=10, every=0, max_failures=2, max_skipped_steps=3)
    with pytest.raises(RunFailed, match=r"step 6: .*non-finite gradient norm in 3 consecutive steps.*checkpoint: none"):
        run_state.run_steps(t, {})
    assert t.ran == [1, 2, 3, 4, 5, 6] and t.recovered == 0  # a finite step (3) resets the count; no rebuild
    assert "step 2: 2 learner update(s) skipped" in caplog.text
    never = SkippingTrainer(tmp_path, set(range(1, 6)), total=5, every=0, max_failures=0, max_skipped_steps=0)
    run_state.run_steps(never, {})
    assert never.ran == [1, 2, 3, 4, 5]


def _lost_soon(group, seconds: float = 10.0) -> list[int]:
    """The group's lost actors once the cluster reports a kill (it takes a moment)."""
    deadline = time.monotonic() + seconds
    while not group.lost_actors() and time.monotonic() < deadline:
        time.sleep(0.2)
    return group.lost_actors()


def test_a_call_past_its_deadline_kills_the_hung_actor_and_a_failed_call_is_raised_as_it_is(ray_local):
    """``ActorGroup.wait`` (the learner's ``learner.call_timeout_s``): a rank not back in time is killed and named
    (ActorLost, healed by the driver); a rank whose call failed while another waits on it is the code's error,
    raised as it is, and nobody is killed."""
    from core.actor_group import ActorGroup

    class Sleeper:  # defined here, so that Ray ships it by value (the workers cannot import a test module)
        def call(self, seconds: float, fail: bool = False) -> float:
            if fail:
                raise ValueError("bad shard")
            time.sleep(seconds)
            return seconds

    with ActorGroup("learner", 2, 0.5, 0, "PACK", "deadline-test") as group:
        group.start(Sleeper, lambda i: ((), {}))
        assert group.wait([a.call.remote(0.1) for a in group.actors], 30, "its step") == [0.1, 0.1]
        with pytest.raises(ValueError, match="bad shard"):
            group.wait([group.actors[0].call.remote(0, True), group.actors[1].call.remote(30)], 2, "its step")
        assert group.lost_actors() == []
        with pytest.raises(ActorLost, match=r"learner actor\(s\) \[1\] did not finish its step within 2 s"):
            group.wait([group.actors[0].call.remote(0), group.actors[1].call.remote(60)], 2, "its step")
        assert _lost_soon(group) == [1]


def _checkpoint(root: Path, step: int) -> Path:
    tmp = ckpt.begin_checkpoint(root, step)
    ckpt.save_trainer_state(tmp, ckpt.TrainerState(step=step, data_cursor=2 * step, rng=ckpt.capture_rng_state()))
    return ckpt.commit_checkpoint(tmp)


def _cfg(resume, total=4):
    return SimpleNamespace(trainer=SimpleNamespace(resume=resume, total_steps=total))


def test_resume_with_an_empty_checkpoint_folder(tmp_path):
    with pytest.raises(RunFailed, match=f"trainer.resume=true but {tmp_path} holds no complete checkpoint"):
        run_state.resume_point(_cfg(True), tmp_path)
    assert run_state.resume_point(_cfg("auto"), tmp_path) is None  # auto: a fresh run
    assert run_state.resume_point(_cfg(False), tmp_path) is None
    (tmp_path / ".tmp-step_000002-0123abcd").mkdir()  # a half-written checkpoint is no checkpoint
    with pytest.raises(RunFailed):
        run_state.resume_point(_cfg(True), tmp_path)


def test_resume_auto_takes_the_latest_complete_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2)
    latest = _checkpoint(tmp_path, 3)
    assert run_state.resume_point(_cfg("auto"), tmp_path) == latest == run_state.resume_point(_cfg(True), tmp_path)
    assert run_state.resume_point(_cfg(False), tmp_path) is None


def test_a_resume_right_after_the_last_step_says_there_is_nothing_left(tmp_path, caplog):
    _checkpoint(tmp_path, 4)
    loaded = []
    trainer = SimpleNamespace(cfg=_cfg(True, total=4), ckpt_root=tmp_path, step_id=0, cursor=0,
                              learner=SimpleNamespace(load_checkpoint=loaded.append))
    with caplog.at_level(logging.WARNING, logger="rl.trainer"):
        state = run_state.resume(trainer)
    assert state.step == 4 and (trainer.step_id, trainer.cursor) == (4, 8)
    assert loaded == [str(tmp_path / "step_000004" / "deepspeed")]
    assert "step_000004 is at step 4, trainer.total_steps = 4: no step left to run" in caplog.text


def test_progress_clock_flags_only_an_actor_that_holds_work_without_returning():
    clock = ProgressClock(3, timeout_s=0.2)
    clock.started(0)
    clock.started(1)
    clock.started(1)  # queued behind its first call: no clock of its own
    assert clock.overdue() == []
    time.sleep(0.15)
    clock.returned(1)  # actor 1 made progress: its clock restarts
    time.sleep(0.1)
    assert clock.overdue() == [0]  # actor 2 never had work, actor 1 returned 0.1 s ago
    assert clock.overdue() == []  # reported once per timeout
    clock.returned(0)
    clock.returned(1)
    time.sleep(0.25)
    assert clock.overdue() == []  # idle actors are never hung
    assert ProgressClock(1, timeout_s=0).overdue() == []
    clock.started(2)
    time.sleep(0.15)
    clock.hold(2)  # restarting meanwhile: the time before counts no more
    time.sleep(0.1)
    assert clock.overdue() == []
    time.sleep(0.15)
    assert clock.overdue() == [2]  # alive again and silent for the whole timeout


def test_restart_runs_every_closer_and_starts_over_with_the_first_rng_state(tmp_path):
    import torch

    closed, started = [], []

    def broken():
        closed.append("broken")
        raise RuntimeError("actor already dead")

    trainer = SimpleNamespace(ckpt_root=tmp_path, fresh_rng=ckpt.capture_rng_state(),
                              start_groups=lambda resume: started.append((resume, torch.rand(1).item())))
    first = torch.rand(1).item()
    run_state.restart(trainer, (broken, lambda: closed.append("other")))
    assert closed == ["broken", "other"] and started == [(False, first)]  # no checkpoint: the run's first RNG draw
    _checkpoint(tmp_path, 2)
    run_state.restart(trainer, ())
    assert started[-1][0] is True
