"""Distributed GRPO loop (Ray actors: rollout, reward pool, DeepSpeed learner ranks) vs a sequential
one-process loop with the same models and settings (generate, score, update in turn, as the paper's trainer
does), measured in one run, plus the share of step time spent in weight sync.

    python benchmarks/bench_loop.py [--steps 4] [key=value ...]

Both loops run the same number of steps after one warm-up step each; the ratio printed is
distributed samples/s over sequential samples/s. On a 2-core machine the distributed loop has no spare
cores to run phases in parallel, so expect a ratio at or below 1 there; the printout says what it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import load_config  # noqa: E402
from core.env import configure_process, worker_env  # noqa: E402


def sequential_steps(cfg, steps: int) -> dict[str, float]:
    """The paper-style loop in this process (``rl.one_process``'s local transport): the same GRPO driver over
    vLLM in-process, rewards in-process and a world-size-1 learner, the plain classes the Ray actors wrap."""
    from rl.local_roles import LocalTransport
    from rl.trainer import GRPOTrainer

    cfg.learner.num_ranks = 1
    trainer = GRPOTrainer(cfg, LocalTransport())
    try:
        trainer.step()  # warm-up
        ms = [trainer.step() for _ in range(steps)]
    finally:
        trainer.rollouts.close()
    return _rates(cfg, ms)


def distributed_steps(cfg, steps: int) -> dict[str, float]:
    import ray

    from rl.trainer import GRPOTrainer

    ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    try:
        trainer = GRPOTrainer(cfg)
        trainer.step()  # warm-up
        ms = [trainer.step() for _ in range(steps)]
        trainer.rollouts.shutdown()
        trainer.learner.shutdown()
        trainer.rewards.shutdown()
    finally:
        ray.shutdown()
    return _rates(cfg, ms)


def _rates(cfg, ms: list[dict[str, float]]) -> dict[str, float]:
    step_s = sum(m["timing/step"] for m in ms) / len(ms)
    sync_s = sum(m.get("timing/sync", 0.0) for m in ms) / len(ms)
    return {"samples_per_s": cfg.grpo.prompts_per_step * cfg.grpo.group_size / step_s, "step_s": step_s,
            "sync_share": sync_s / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    configure_process()
    overrides = ["trainer.progress_bar=false", "trainer.image_every=0", "trainer.checkpoint_every=0",
                 "output_dir=runs/bench_loop", *args.overrides]
    from models.bootstrap import ensure_models

    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", overrides)
    ensure_models(cfg)
    dist = distributed_steps(cfg, args.steps)
    seq = sequential_steps(load_config(ROOT / "configs/grpo_random_local.yaml", overrides), args.steps)
    print(f"machine: {os.cpu_count()} CPUs; {args.steps} timed steps each after one warm-up; "
          f"B x G = {cfg.grpo.prompts_per_step} x {cfg.grpo.group_size}")
    print(f"{'loop':<13}{'step s':>9}{'samples/s':>11}{'sync share':>12}")
    for name, r in (("distributed", dist), ("sequential", seq)):
        print(f"{name:<13}{r['step_s']:>9.2f}{r['samples_per_s']:>11.2f}{r['sync_share']:>12.1%}")
    print(f"ratio distributed / sequential samples/s: {dist['samples_per_s'] / seq['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
