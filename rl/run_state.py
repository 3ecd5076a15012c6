"""What both drivers (GRPO, cold-start SFT) share about a run's state: phase timing, the failure they end with,
and checkpoint save / resume around the learner group (no Ray import here).

A checkpoint directory (``core.checkpoint``, committed atomically) holds the learner's DeepSpeed state in
``deepspeed/``, the HF/diffusers export of both models in ``export/`` (what ``policy.init_from`` /
``diffusion.init_from`` or an evaluation loads) and the driver's ``TrainerState`` (step, data cursor, RNG,
``extra``).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from core import checkpoint as ckpt
from core.run_folder import CONFIG_FILE
from rl.preemption import StopRequest, inject_sigterm

log = logging.getLogger("rl.trainer")


class RunFailed(RuntimeError):
    """The run cannot go on; the message names the last complete checkpoint to resume from."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for the console and RunFailed (Ray's errors span many lines)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def run_failed(step: int, exc: BaseException, root: Path) -> RunFailed:
    """The RunFailed for a step that raised ``exc`` (a Ray actor or group that cannot recover)."""
    latest = ckpt.latest_complete(root)
    return RunFailed(
        f"step {step} failed: {one_line(exc)}; "
        f"last complete checkpoint: {latest or 'none'}; continue with trainer.resume=auto"
    )


class PhaseTimer:
    """Wall time per phase of one step -> ``timing/<phase>`` seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _fault_injection_pause(step: int) -> None:
    """Fault injection for tests that kill the run while a checkpoint is half written:
    REALSR_FAULT_CHECKPOINT_PAUSE="STEP:SECONDS" holds step STEP's checkpoint uncommitted that long."""
    spec = os.environ.get("REALSR_FAULT_CHECKPOINT_PAUSE", "")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            log.warning("fault injection: holding checkpoint %d uncommitted for %s s", step, seconds)
            time.sleep(float(seconds))


def step_seed(run_seed: int, step: int) -> int:
    """Step ``step``'s seed from ``trainer.seed``: its chains' sampling and its advantage transforms (reproducible,
    resumable; the held-out evaluation takes a step far past any run's)."""
    return run_seed * 1_000_003 + step


def should_checkpoint(step: int, every: int, total_steps: int) -> bool:
    """Every ``every`` steps and at the last one; never when ``every`` is 0."""
    return bool(every) and (step % every == 0 or step == total_steps)


def run_steps(trainer: Any, progress: Mapping[str, str]) -> None:
    """The loop both drivers share: ``trainer.step()`` until ``cfg.trainer.total_steps``, the progress bar
    fed from the step's metrics (``progress``: bar label -> metric key) and a checkpoint when due.

    A failure the actors cannot survive by themselves (the transport's ``lost_actor_errors``: a learner rank died, a
    rollout actor or every reward actor past its restarts, a failed sync) is healed up to ``trainer.max_failures``
    times: ``trainer.recover()`` rebuilds every role from the latest complete checkpoint (or from the start), the
    steps after it are redone and their TensorBoard points replaced (``faults/*`` logs each recovery). One failure
    too many, or the same error at the same step right after a rebuild (``repeated``), ends the run with RunFailed
    naming the checkpoint to resume from; any other error ends it at once. ``trainer.max_skipped_steps``
    consecutive steps whose update was skipped for a non-finite gradient end it too (``check_updates``).

    SIGTERM ends the run at the next step boundary with a checkpoint, normally (``rl.preemption``).

    An exception an actor's code raised while every actor is alive (``transport.is_lost``: a bug, a bad input, a
    full disk) ends the run at once, without a rebuild.

    ``trainer`` has ``cfg``, ``transport``, ``step_id``, ``ckpt_root``, ``monitor``, ``step()``, ``roles()``,
    ``save_checkpoint()`` and ``recover()``; ``trainer.faults`` gets one ``Fault`` per recovery.
    """
    cfg = trainer.cfg.trainer
    lost_actor = trainer.transport.lost_actor_errors()  # Ray's, or none in one process
    trainer.faults = getattr(trainer, "faults", [])
    streak = 0  # consecutive steps whose update was skipped (check_updates)
    try:
        with StopRequest() as stop:
            while trainer.step_id < cfg.total_steps and not stop.requested:
                try:
                    inject_sigterm(trainer.step_id + 1)
                    metrics = trainer.step()
                    streak = check_updates(metrics, streak, cfg.max_skipped_steps, trainer.step_id,
                                           trainer.ckpt_root)
                    trainer.monitor.progress(trainer.step_id, {label: metrics.get(key, float("nan"))
                                                               for label, key in progress.items()})
                    if stop.requested or should_checkpoint(trainer.step_id, cfg.checkpoint_every, cfg.total_steps):
                        trainer.save_checkpoint()
                except lost_actor as exc:  # an actor (group) lost, or an actor's code failed
                    if not trainer.transport.is_lost(exc, trainer.roles()):
                        log.error("step %d: an actor's code raised %s with every actor alive: not a lost actor; "
                                  "ending the run", trainer.step_id + 1, one_line(exc))
                        raise run_failed(trainer.step_id + 1, exc, trainer.ckpt_root) from exc
                    if len(trainer.faults) >= cfg.max_failures or repeated(trainer.faults, trainer.step_id + 1, exc):
                        raise run_failed(trainer.step_id + 1, exc, trainer.ckpt_root) from exc
                    trainer.faults.append(heal(trainer, exc))
            if stop.requested and trainer.step_id < cfg.total_steps:
                log.warning("stopped at step %d of %d on request, checkpoint written; continue with "
                            "trainer.resume=auto", trainer.step_id, cfg.total_steps)
    finally:
        trainer.monitor.close()


def check_updates(metrics: Mapping[str, float], streak: int, limit: int, step: int, root: Path) -> int:
    """The driver's numerical guard after step ``step``: the learner skipped an update whose gradient norm was not
    finite (``learner/skipped_updates``; its weights are unchanged). Returns the streak of consecutive steps with a
    skip; ``limit`` of them in a row end the run with RunFailed naming the step and the checkpoint to resume from
    (0: never)."""
    skipped = metrics.get("learner/skipped_updates", 0.0)
    if not skipped:
        return 0
    streak += 1
    log.warning("step %d: %d learner update(s) skipped for a non-finite gradient norm (the weights are unchanged); "
                "%d step(s) in a row", step, int(skipped), streak)
    if limit and streak >= limit:
        latest = ckpt.latest_complete(root)
        raise RunFailed(f"step {step}: the learner skipped its update for a non-finite gradient norm in {streak} "
                        f"consecutive steps (trainer.max_skipped_steps={limit}); last complete checkpoint: "
                        f"{latest or 'none'}")
    return streak


def repeated(faults: Sequence["Fault"], step: int, exc: BaseException) -> bool:
    """The same error at the same step right after a rebuild: not a lost actor but what the step does (a bug, a
    bad input, a full disk inside an actor), which another rebuild would only repeat."""
    if faults and faults[-1].step == step and faults[-1].error == one_line(exc):
        log.error("step %d failed again with the same error after a rebuild (%s): not a lost actor; ending the "
                  "run", step, one_line(exc))
        return True
    return False


@dataclass
class Fault:
    """One recovery: where the run failed, what it resumed from, and what it cost."""

    step: int  # the 1-based step that failed
    error: str
    resumed_at: int  # the checkpoint's step (0: no checkpoint, the run started over)
    steps_redone: int  # completed steps after that checkpoint, run again
    seconds: float  # teardown + rebuild + restore


def heal(trainer: Any, exc: BaseException) -> Fault:
    """``trainer.recover()`` after ``exc``, logged on the console and as ``faults/*`` at the step it resumes."""
    failed, start = trainer.step_id + 1, time.perf_counter()
    error = one_line(exc)
    n, limit = len(trainer.faults) + 1, trainer.cfg.trainer.max_failures
    log.warning("step %d failed (%s); recovery %d of %d: rebuilding the actors from the latest complete "
                "checkpoint", failed, error, n, limit)
    trainer.recover()
    fault = Fault(failed, error, trainer.step_id, failed - 1 - trainer.step_id, time.perf_counter() - start)
    trainer.monitor.rewind(trainer.step_id)  # the redone steps' points replace the old ones
    trainer.monitor.scalars(trainer.step_id + 1, {"faults/recoveries": float(n),
                                                  "faults/steps_redone": float(fault.steps_redone),
                                                  "faults/recovery_s": fault.seconds})
    log.warning("recovered in %.1f s: resumed at step %d, redoing %d completed step(s)", fault.seconds,
                fault.resumed_at, fault.steps_redone)
    return fault


def restart(trainer: Any, closers: Sequence[Callable[[], Any]]) -> None:
    """Both drivers' ``recover``: run every closer of the half-dead groups (one that fails is logged, the others
    still run), then ``trainer.start_groups`` from the latest complete checkpoint, or from step 0 with the RNG state
    the run began with (``trainer.fresh_rng``), so the redone steps are the ones the run would have made."""
    for close in closers:
        try:
            close()
        except Exception as exc:  # noqa: BLE001
            log.warning("recovery teardown: %s: %s", type(exc).__name__, exc)
    latest = ckpt.latest_complete(trainer.ckpt_root)
    if latest is None:
        ckpt.restore_rng_state(trainer.fresh_rng)
    trainer.start_groups(resume=latest is not None)


def save_checkpoint(learner: Any, root: Path, step: int, cursor: int, keep: int, config_yaml: str,
                    extra: Optional[dict[str, Any]] = None) -> Path:
    """DeepSpeed state (all ranks) + HF/diffusers export + trainer state + the run's config (what a resume is
    compared with: ``core.run_folder``), committed atomically; older checkpoints beyond ``keep`` are pruned.
    ``learner``: the transport's learner group (anything with ``save_checkpoint`` / ``export_hf``)."""
    tmp = ckpt.begin_checkpoint(root, step)
    try:
        (tmp / CONFIG_FILE).write_text(config_yaml)
        learner.save_checkpoint(str(tmp / "deepspeed"))
        learner.export_hf(str(tmp / "export"))
        state = ckpt.TrainerState(step=step, data_cursor=cursor, rng=ckpt.capture_rng_state(),
                                  extra=dict(extra or {}))
        ckpt.save_trainer_state(tmp, state)
        _fault_injection_pause(step)
        final = ckpt.commit_checkpoint(tmp)
    except BaseException:
        ckpt.abort_checkpoint(tmp)
        raise
    ckpt.prune(root, keep)
    log.info("checkpoint %s", final)
    return final


def resume_point(cfg: Any, root: Path) -> Optional[Path]:
    """The checkpoint ``trainer.resume`` starts from, checked before any actor is built: None for a fresh run
    (resume false, or auto with none yet); RunFailed for resume true without a complete checkpoint."""
    mode = cfg.trainer.resume
    if mode is False:
        return None
    latest = ckpt.latest_complete(root)
    if latest is None:
        if mode is True:
            raise RunFailed(f"trainer.resume=true but {root} holds no complete checkpoint; use trainer.resume=auto "
                            "to start fresh when there is none")
        log.info("resume: no complete checkpoint under %s, starting fresh (trainer.resume=auto)", root)
    return latest


def resume(trainer: Any) -> Optional[ckpt.TrainerState]:
    """Both drivers' resume: the learner from the latest complete checkpoint, ``trainer.step_id`` and
    ``trainer.cursor`` from its state, which is returned for the driver's own ``extra`` (None: nothing to
    resume from, the run starts fresh). A checkpoint at or past ``trainer.total_steps`` is said loudly: the run
    has nothing left to do."""
    found = load_latest(trainer.learner, trainer.ckpt_root)
    if found is None:
        return None
    latest, state = found
    trainer.step_id, trainer.cursor = state.step, state.data_cursor
    log.info("resumed from %s at step %d (data cursor %d)", latest, state.step, state.data_cursor)
    total = trainer.cfg.trainer.total_steps
    if state.step >= total:
        log.warning("%s is at step %d, trainer.total_steps = %d: no step left to run; raise trainer.total_steps "
                    "to train on", latest.name, state.step, total)
    return state


def load_latest(learner: Any, root: Path) -> Optional[tuple[Path, ckpt.TrainerState]]:
    """Load the newest complete checkpoint under ``root`` into ``learner`` and restore the driver's RNGs;
    returns (its path, its TrainerState), or None when there is none."""
    latest = ckpt.latest_complete(root)
    if latest is None:
        return None
    state = ckpt.load_trainer_state(latest)
    learner.load_checkpoint(str(latest / "deepspeed"))
    ckpt.restore_rng_state(state.rng)
    return latest, state
