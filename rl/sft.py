"""The supervised cold-start driver (paper.md 3): synthesised target chains -> the same DeepSpeed learner.

No rollout or reward actors: each step the driver reads ``sft.batch_size`` training pairs at the data cursor,
synthesises their target chains (``rl.sft_data``) and hands them to the learner group, whose ranks train text
cross-entropy plus the diffusion denoising loss (``LearnerWorker.sft_step``). Checkpoints (DeepSpeed state, HF
export, trainer state) and resume are shared with the GRPO driver (``rl.run_state``); a checkpoint's
``export/policy`` and ``export/diffusion`` are what a GRPO run's ``policy.init_from`` / ``diffusion.init_from``
name.

``trainer.total_steps`` counts steps (one optimizer step each); ``sft.epochs`` is not used by this driver: the
data cursor runs through the shuffled-by-hash training split ``total_steps x batch_size`` times over.
"""

from __future__ import annotations

import logging
from pathlib import Path

from learner.group import LearnerGroup
from rl import run_state
from rl.config import ExperimentConfig
from rl.data.dataset import PairDataset
from rl.models.policy import ChainTokens
from rl.monitor import RunMonitor
from rl.run_state import PhaseTimer
from rl.sft_data import SFTRecord, target_records

log = logging.getLogger("rl.sft")


class SFTTrainer:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.data = PairDataset(cfg.data, "train")
        self.tokens = ChainTokens.from_pretrained(cfg.policy.path)
        self.learner = LearnerGroup(cfg, sft=cfg.sft)
        self.ckpt_root = Path(cfg.trainer.checkpoint_dir)
        self.step_id = 0
        self.cursor = 0
        if cfg.trainer.resume:
            run_state.resume(self)
        self.monitor = RunMonitor(cfg.trainer.log_dir, cfg.trainer.total_steps, self.step_id,
                                  cfg.trainer.progress_bar, desc="sft")

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
                                         self.cfg.trainer.keep_checkpoints, {"mode": "sft"})


# ---------------------------------------------------------------------------------------------- evaluation
def format_eval(cfg: ExperimentConfig, export_dir: str | Path, num_samples: int = 32,
                engine: str = "vllm") -> dict[str, float | list[str]]:
    """Greedy (temperature 0) chains of an exported checkpoint on held-out LR images (``PairDataset`` split
    eval, cursors 0..num_samples-1), sampled turn by turn with ``ChainSampler`` as a rollout would be:
    the share with ``format_reward == 1``, the mean degradation reward, and the texts."""
    from dataclasses import replace

    from actors.chain_sampler import ChainSampler
    from actors.sr_pipeline import SRPipeline
    from actors.text_engine import build_text_engine
    from rewards.degradation import degradation_reward
    from rewards.format import format_reward

    export = Path(export_dir)
    greedy = replace(cfg.rollout.sampling, temperature=0.0, top_p=1.0, top_k=-1)
    text_engine = build_text_engine(engine, export / "policy", greedy, cfg.chain.max_stage_tokens,
                                    vllm=cfg.rollout.vllm, dtype=cfg.policy.dtype, seed=cfg.trainer.seed)
    pipeline = SRPipeline.from_pretrained(str(export / "diffusion"))
    sampler = ChainSampler(text_engine, pipeline, cfg.chain, cfg.diffusion, greedy)
    samples = PairDataset(cfg.data, "eval").batch(0, num_samples)
    rollouts = sampler.sample(samples, group_size=1, seed=cfg.trainer.seed)
    formats = [format_reward(r.text) for r in rollouts]
    degradation = [degradation_reward(r.text, s.degradation) for r, s in zip(rollouts, samples)]
    return {"format_reward": sum(formats) / len(formats), "degradation_reward": sum(degradation) / len(degradation),
            "chains": float(len(rollouts)), "texts": [r.text for r in rollouts]}


def main(argv: list[str] | None = None) -> int:
    """``python -m rl.sft CONFIG EXPORT_DIR [N]``: the held-out greedy format check of an export."""
    import sys

    from rl.config import load_config
    from rl.env import configure_process

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m rl.sft CONFIG EXPORT_DIR [NUM_SAMPLES]", file=sys.stderr)
        return 2
    configure_process()
    result = format_eval(load_config(args[0]), args[1], int(args[2]) if len(args) == 3 else 32)
    texts = result.pop("texts")
    for text in texts[:3]:
        print(text)
    print({k: round(v, 4) for k, v in result.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
