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
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from core import checkpoint as ckpt

log = logging.getLogger("rl.trainer")


class RunFailed(RuntimeError):
    """The run cannot go on; the message names the last complete checkpoint to resume from."""


def run_failed(step: int, exc: BaseException, root: Path) -> RunFailed:
    """The RunFailed for a step that raised ``exc`` (a Ray actor or group that cannot recover)."""
    latest = ckpt.latest_complete(root)
    return RunFailed(
        f"step {step} failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}; "
        f"last complete checkpoint: {latest or 'none'}; continue with trainer.resume=true"
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


def should_checkpoint(step: int, every: int, total_steps: int) -> bool:
    """Every ``every`` steps and at the last one; never when ``every`` is 0."""
    return bool(every) and (step % every == 0 or step == total_steps)


def run_steps(trainer: Any, progress: Mapping[str, str]) -> None:
    """The loop both drivers share: ``trainer.step()`` until ``cfg.trainer.total_steps``, the progress bar
    fed from the step's metrics (``progress``: bar label -> metric key), a checkpoint when due, and a Ray
    failure the run cannot recover from (a learner rank died) turned into RunFailed naming the checkpoint.

    ``trainer`` has ``cfg``, ``step_id``, ``ckpt_root``, ``monitor``, ``step()`` and ``save_checkpoint()``.
    """
    from ray.exceptions import RayError  # here, so this module imports without Ray

    cfg = trainer.cfg.trainer
    try:
        while trainer.step_id < cfg.total_steps:
            try:
                metrics = trainer.step()
            except RayError as exc:
                raise run_failed(trainer.step_id + 1, exc, trainer.ckpt_root) from exc
            trainer.monitor.progress(trainer.step_id, {label: metrics.get(key, float("nan"))
                                                       for label, key in progress.items()})
            if should_checkpoint(trainer.step_id, cfg.checkpoint_every, cfg.total_steps):
                trainer.save_checkpoint()
    finally:
        trainer.monitor.close()


def save_checkpoint(learner: Any, root: Path, step: int, cursor: int, keep: int,
                    extra: Optional[dict[str, Any]] = None) -> Path:
    """DeepSpeed state (all ranks) + HF/diffusers export + trainer state, committed atomically; older
    checkpoints beyond ``keep`` are pruned. ``learner``: a ``LearnerGroup`` (or anything with its
    ``save_checkpoint`` / ``export_hf``)."""
    tmp = ckpt.begin_checkpoint(root, step)
    try:
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


def resume(trainer: Any) -> Optional[ckpt.TrainerState]:
    """Both drivers' resume: the learner from the latest complete checkpoint, ``trainer.step_id`` and
    ``trainer.cursor`` from its state, which is returned for the driver's own ``extra`` (None: nothing to
    resume from, the run starts fresh)."""
    found = load_latest(trainer.learner, trainer.ckpt_root)
    if found is None:
        return None
    latest, state = found
    trainer.step_id, trainer.cursor = state.step, state.data_cursor
    log.info("resumed from %s at step %d (data cursor %d)", latest, state.step, state.data_cursor)
    return state


def load_latest(learner: Any, root: Path) -> Optional[tuple[Path, ckpt.TrainerState]]:
    """Load the newest complete checkpoint under ``root`` into ``learner`` and restore the driver's RNGs;
    returns (its path, its TrainerState), or None (logged) when there is none."""
    latest = ckpt.latest_complete(root)
    if latest is None:
        log.info("resume: no complete checkpoint under %s, starting fresh", root)
        return None
    state = ckpt.load_trainer_state(latest)
    learner.load_checkpoint(str(latest / "deepspeed"))
    ckpt.restore_rng_state(state.rng)
    return latest, state
