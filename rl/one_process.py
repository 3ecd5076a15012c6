"""The cold start and the GRPO loop in one process, without Ray: the plain classes the actors wrap
(``RolloutWorker``, ``RewardWorker``, ``LearnerWorker`` at world size 1) called in turn, the paper's trainer shape.

    python -m rl.one_process configs/grpo_1gpu.yaml [key=value ...]

For a machine that has a GPU but no Ray or vLLM (the device check, ``scripts/gpu_check.sh``) and for the sequential
baseline of ``benchmarks/bench_loop.py``. It reads the same configs and runs the same samplers, rewards, advantages,
learner (DeepSpeed at world size 1: NCCL and bf16 on a GPU) and weight loading as ``rl.launch``, writes the same
TensorBoard scalars and the same exports (``checkpoints/step_N/export``, which a GRPO config's ``init_from`` names).
What needs several processes is ``rl.launch``'s alone: the asynchronous pipeline, DeepSpeed checkpoints and
resume, fault healing, the collective weight sync; a config asking for the first two is an error here.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from core.checkpoint import step_dir_name
from core.config import ConfigError, ExperimentConfig, cold_start_config, cold_start_pending, load_config, to_yaml
from core.env import configure_process
from rl.advantages import advantage_metrics, step_advantages
from rl.monitor import RunMonitor, reward_metrics

log = logging.getLogger("rl.one_process")


def local_dist_env(port: Optional[int] = None) -> dict[str, str]:
    """A world-size-1 process group on this machine (a free port unless ``port``)."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def check_one_process(cfg: ExperimentConfig) -> None:
    """What only ``rl.launch`` can do is an error here, naming the key."""
    if cfg.trainer.max_staleness:
        raise ConfigError(f"key 'trainer.max_staleness' = {cfg.trainer.max_staleness}: the asynchronous pipeline "
                          "needs rl.launch (one process runs its phases in turn)")
    if cfg.trainer.resume is not False:
        raise ConfigError(f"key 'trainer.resume' = {cfg.trainer.resume!r}: resuming needs rl.launch's DeepSpeed "
                          "checkpoints (one process writes exports only)")
    if cfg.learner.num_ranks != 1:
        raise ConfigError(f"key 'learner.num_ranks' = {cfg.learner.num_ranks}: one process is one learner rank")


class OneProcessSFT:
    """The cold start (``rl.sft``'s step) on one learner rank."""

    def __init__(self, cfg: ExperimentConfig, dist_env: Optional[dict[str, str]] = None):
        from data.dataset import PairDataset
        from learner.worker import LearnerWorker
        from models.chain_tokens import ChainTokens

        self.cfg = cfg
        self.data = PairDataset(cfg.data, "train")
        self.tokens = ChainTokens.from_pretrained(cfg.policy.path)
        self.learner = LearnerWorker.from_config(cfg, dist_env or local_dist_env())
        self.cursor = 0
        self.example = None  # the last step's first target chain: the image panel

    def step(self) -> dict[str, float]:
        from data.sft_targets import target_records

        start = time.perf_counter()
        records = target_records(self.data.batch(self.cursor, self.cfg.sft.batch_size), self.tokens, self.cfg)
        m = self.learner.sft_step(*records)
        self.cursor += len(records)
        self.example = records[0]
        return {**{f"sft/{k}": m[k] for k in ("text_loss", "image_loss", "token_accuracy") if k in m},
                **{f"learner/{k}": v for k, v in m.items()}, "timing/step": time.perf_counter() - start}

    def close(self) -> None:
        """Nothing beyond the learner, which the process's end releases."""


class OneProcessGRPO:
    """``rl.trainer.GRPOTrainer``'s step in one process: sample, score, advantages, update, load the new weights."""

    def __init__(self, cfg: ExperimentConfig, dist_env: Optional[dict[str, str]] = None):
        from actors.rollout import RolloutWorker
        from data.dataset import PairDataset
        from learner.worker import LearnerWorker
        from rewards.worker import RewardWorker
        from rl.held_out import HeldOutEval

        self.cfg = cfg
        self.data = PairDataset(cfg.data, "train")
        self.rollout = RolloutWorker(cfg)
        self.reward = RewardWorker(cfg.reward, "cuda" if cfg.reward.num_gpus > 0 else "cpu")
        self.learner = LearnerWorker.from_config(cfg, dist_env or local_dist_env(),
                                                 logprob_temperature=cfg.rollout.sampling.temperature)
        self.held_out = HeldOutEval(cfg) if cfg.trainer.eval_every else None
        self.version = 0
        self.example: tuple = ()  # the last step's first chain, its sample and its scores: the image panel

    def close(self) -> None:
        """Shut the text engine down before another is built in this process (see VLLMTextEngine.close)."""
        self.rollout.close()

    def seed(self, step: int) -> int:
        return self.cfg.trainer.seed * 1_000_003 + step  # rl.trainer's: the same chains for the same step

    def step(self, step: int) -> dict[str, float]:
        """Step ``step`` (0-based) of the run; its metrics, named as ``rl.trainer`` names them."""
        cfg, G, t = self.cfg, self.cfg.grpo.group_size, {}
        start = time.perf_counter()
        samples = self.data.batch(step * cfg.grpo.prompts_per_step, cfg.grpo.prompts_per_step)
        chains = self.rollout.generate(samples, G, seed=self.seed(step))
        t["rollout"] = time.perf_counter() - start
        scores = self.reward.score(list(zip(chains, [s for s in samples for _ in range(G)])))
        t["reward"] = time.perf_counter() - start - t["rollout"]
        self.example = (chains[0], samples[0], scores[0])
        adv = step_advantages(cfg, scores, self.seed(step))
        keep = adv.groups.keep if cfg.grpo.filter_zero_variance else torch.ones_like(adv.groups.keep)
        kept = [i for i, k in enumerate(keep.tolist()) if k]
        learner_metrics: dict[str, float] = {}
        if kept:
            mark = time.perf_counter()
            records = adv.per_chain()
            learner_metrics = self.learner.train_chains([records[i] for i in kept], False, *[chains[i] for i in kept])
            t["learner"] = time.perf_counter() - mark
            mark = time.perf_counter()
            self.load_weights()
            t["sync"] = time.perf_counter() - mark
        t["step"] = time.perf_counter() - start
        return {**reward_metrics(scores, G), **advantage_metrics(adv, keep),
                **{f"learner/{k}": v for k, v in learner_metrics.items()},
                **{f"timing/{k}": v for k, v in t.items()}, "policy/version": float(self.version),
                "throughput/samples_per_s": len(scores) / t["step"]}

    def load_weights(self) -> None:
        """The learner's new weights into the text engine and the SR pipeline: what a sync ships (the LoRA adapters
        alone, or the merged weights: ``<model>.lora.sync``)."""
        self.version += 1
        if "policy" in self.learner.engines:
            self.rollout.engine.load_weights(self.learner.sync_state("policy").items(), self.version)
            self.rollout.policy_version = self.version
        if "diffusion" in self.learner.engines:
            self.rollout.load_diffusion_state(self.learner.sync_state("diffusion").items())
            self.rollout.diffusion_version = self.version

    def evaluate(self) -> dict[str, float]:
        """``rl.held_out``'s ``eval/`` metrics: the same held-out prompts and seeds every time."""
        start = time.perf_counter()
        h = self.held_out
        chains = self.rollout.generate(h.samples, h.group_size, seed=h.seed, explore=False)
        scores = self.reward.score(list(zip(chains, [s for s in h.samples for _ in range(h.group_size)])))
        return {**h.metrics(chains, scores), "timing/eval": time.perf_counter() - start}


def _log_example(monitor: RunMonitor, step: int, example) -> None:
    """The image panel and chain text ``rl.trainer`` / ``rl.sft`` log (a GRPO chain, or an SFT target chain)."""
    if isinstance(example, tuple):
        chain, sample, score = example
        monitor.panel(step, "chain/images", {"lr": sample.lr, **chain.images, "hr": sample.hr})
        monitor.text(step, "chain/text", f"{chain.text}\n\nreward {score.total:.3f}")
    else:
        targets = {s.stage: s.target for s in example.stages}
        monitor.panel(step, "sft/targets", {"lr": example.context_images[0], **targets})
        monitor.text(step, "sft/target_chain", example.text)


def export_dir(cfg: ExperimentConfig, step: int) -> Path:
    return Path(cfg.trainer.checkpoint_dir) / step_dir_name(step) / "export"


def fit(cfg: ExperimentConfig, dist_env: Optional[dict[str, str]] = None) -> Path:
    """Run ``cfg`` (sft or grpo) to ``trainer.total_steps``; TensorBoard in ``trainer.log_dir``; an export every
    ``trainer.checkpoint_every`` steps and at the end. Returns the last export."""
    from models.bootstrap import ensure_models

    check_one_process(cfg)
    ensure_models(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    run = OneProcessSFT(cfg, dist_env) if cfg.mode == "sft" else OneProcessGRPO(cfg, dist_env)
    monitor = RunMonitor(cfg.trainer.log_dir, cfg.trainer.total_steps, 0, cfg.trainer.progress_bar, desc=cfg.mode)
    every, total = cfg.trainer.checkpoint_every, cfg.trainer.total_steps
    try:
        if cfg.mode == "grpo" and cfg.trainer.eval_every:  # where the eval/ curves start
            monitor.scalars(0, run.evaluate())
        for step in range(total):
            metrics = run.step() if cfg.mode == "sft" else run.step(step)
            done = step + 1
            if cfg.mode == "grpo" and cfg.trainer.eval_every and done % cfg.trainer.eval_every == 0:
                metrics.update(run.evaluate())
            monitor.scalars(done, metrics)
            if cfg.trainer.image_every and done % cfg.trainer.image_every == 0:
                _log_example(monitor, done, run.example)
            monitor.progress(done, {k: metrics[k] for k in ("reward/total/mean", "sft/text_loss", "timing/step")
                                    if k in metrics})
            monitor.flush()
            if done == total or (every and done % every == 0):
                run.learner.export_hf(str(export_dir(cfg, done)))
    finally:
        monitor.close()
        run.close()
    return export_dir(cfg, total)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_process()
    parser = argparse.ArgumentParser(prog="python -m rl.one_process", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        runs = [cold_start_config(cfg), cfg] if cold_start_pending(cfg) else [cfg]
        for run in runs:
            check_one_process(run)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    for run in runs:
        log.info("%s run %s: outputs in %s", run.mode, run.name, run.output_dir)
        fit(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
