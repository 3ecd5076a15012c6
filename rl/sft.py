"""The supervised cold-start driver (the paper's first stage): synthesised target chains -> the same DeepSpeed learner.

No rollout or reward roles: each step the driver reads ``sft.batch_size`` training pairs at the data cursor,
synthesises their target chains (``data.sft_targets``) and hands them to the learner group, whose ranks train text
cross-entropy plus the diffusion denoising loss (``learner.sft_step``). Checkpoints (DeepSpeed state, HF
export, trainer state) and resume are shared with the GRPO driver (``rl.run_state``); a checkpoint's
``export/policy`` and ``export/diffusion`` are what a GRPO run's ``policy.init_from`` / ``diffusion.init_from``
name.

``trainer.total_steps`` counts steps (one optimizer step each): the data cursor runs through the
shuffled-by-hash training split, ``sft.batch_size`` samples a step. The held-out check of an export is
``python -m tools.eval --checkpoint runs/sft_local/checkpoints --greedy``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from core import checkpoint as ckpt
from core.config import ExperimentConfig, to_yaml
from data.dataset import PairDataset
from data.sft_targets import SFTRecord, target_records
from models.chain_tokens import ChainTokens
from rl import run_state
from rl.monitor import RunMonitor
from rl.run_state import PhaseTimer
from rl.transport import RayTransport, Transport

log = logging.getLogger("rl.sft")


class SFTTrainer:
    def __init__(self, cfg: ExperimentConfig, transport: Optional[Transport] = None):
        self.cfg = cfg
        self.transport = transport or RayTransport()  # rl.transport: Ray actors, or this process
        self.transport.check(cfg)
        self.data = PairDataset(cfg.data, "train")
        self.tokens = ChainTokens.from_pretrained(cfg.policy.path)
        self.ckpt_root = Path(cfg.trainer.checkpoint_dir)
        resume_from = run_state.resume_point(cfg, self.ckpt_root)  # trainer.resume=true without one fails here
        self.fresh_rng = ckpt.capture_rng_state()
        self.start_groups(resume=resume_from is not None)
        self.monitor = RunMonitor(cfg.trainer.log_dir, cfg.trainer.total_steps, self.step_id,
                                  cfg.trainer.progress_bar, desc="sft")

    def start_groups(self, resume: bool) -> None:
        self.learner = self.transport.learner_group(self.cfg, sft=self.cfg.sft)
        self.step_id = self.cursor = 0
        if resume:
            run_state.resume(self)

    def roles(self) -> list[Any]:
        """The live role groups (what ``run_state.run_steps`` asks whether an actor was lost)."""
        return [self.learner]

    def recover(self) -> None:
        """A new learner group from the latest complete checkpoint (or the start) after a lost rank."""
        run_state.restart(self, (self.learner.shutdown,))

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> None:
        run_state.run_steps(self, {"text": "sft/text_loss", "img": "sft/image_loss",
                                   "acc": "sft/token_accuracy", "s/step": "timing/step"})

    def records(self, cursor: int, n: int) -> list[SFTRecord]:
        """The target chains of data positions cursor .. cursor + n - 1."""
        return target_records(self.data.batch(cursor, n), self.tokens, self.cfg)

    def step(self) -> dict[str, float]:
        cfg, t = self.cfg, PhaseTimer()
        B = cfg.sft.batch_size
        with t("step"):
            with t("data"):
                records = self.records(self.cursor, B)
            with t("learner"):
                m = self.learner.sft(records)
            self.cursor += B
            self.step_id += 1
        metrics = {
            **{f"sft/{k}": m[k] for k in ("text_loss", "image_loss", "token_accuracy") if k in m},
            **{f"learner/{k}": v for k, v in m.items()},
            **{f"timing/{k}": v for k, v in t.seconds.items()},
            "throughput/samples_per_s": B / t.seconds["step"],
            "throughput/tokens_per_s": m["tokens"] / t.seconds["step"],
            "data/skipped_files": float(sum(self.data.stats.values())),
        }
        self.monitor.scalars(self.step_id, metrics)
        if cfg.trainer.image_every and self.step_id % cfg.trainer.image_every == 0:
            r = records[0]
            self.monitor.panel(self.step_id, "sft/targets",
                               {"lr": r.context_images[0], **{s.stage: s.target for s in r.stages}})
            self.monitor.text(self.step_id, "sft/target_chain", r.text)
        self.monitor.flush()
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """DeepSpeed state (all ranks) + HF/diffusers export + trainer state, committed atomically."""
        return run_state.save_checkpoint(self.learner, self.ckpt_root, self.step_id, self.cursor,
                                         self.cfg.trainer.keep_checkpoints, to_yaml(self.cfg),
                                         {"mode": "sft"})
