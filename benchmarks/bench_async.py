"""Asynchronous (trainer.max_staleness = k) vs synchronous (k = 0) GRPO on the embedded default, in one run, and
the limit this machine allows.

    PYTHONPATH=. python benchmarks/bench_async.py [--steps 6] [--k 1] [--order sync,async] [key=value ...]

Both runs are the real driver (``rl.trainer.GRPOTrainer``: Ray rollout actor, reward pool, DeepSpeed learner
ranks) on the same Ray cluster and config, one warm-up step each, then ``--steps`` timed steps. Printed:
samples/s of each and their ratio; each run's phases per step; the machine's busy core-seconds per step (from
/proc/stat); and the bound an overlap can reach here,

    async step >= max(work core-seconds / cores, rollout + reward, learner + sync)

(the work cannot run faster than the cores allow, and each side of the overlap stays serial), so the best
ratio is the synchronous step over that bound. The work is taken as the smaller busy time of the two runs: busy
time also counts spin-waiting (gloo and DeepSpeed poll while a rank waits for the other), which the synchronous
run does more of. ``--order async,sync`` (or sync,async,async,sync) checks that the
order does not decide the ratio on a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import load_config  # noqa: E402
from core.env import configure_process, worker_env  # noqa: E402

PHASES = ("rollout", "reward", "wait", "learner", "sync")


def busy_seconds() -> float:
    """Core-seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal) since boot."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run(cfg, steps: int) -> dict[str, float]:
    from rl.trainer import GRPOTrainer

    trainer = GRPOTrainer(cfg)
    try:
        trainer.step()  # warm-up: engines, allocator, the producer's first batch
        busy0, t0 = busy_seconds(), time.perf_counter()
        ms = [trainer.step() for _ in range(steps)]
        wall, busy = time.perf_counter() - t0, busy_seconds() - busy0
    finally:
        trainer.pipeline.close()
        for group in (trainer.rollouts, trainer.learner, trainer.rewards):
            group.shutdown()
    n = cfg.grpo.prompts_per_step * cfg.grpo.group_size * steps
    out = {"samples_per_s": n / wall, "step_s": wall / steps, "busy_per_step": busy / steps,
           "staleness_max": max(m["async/staleness_max"] for m in ms)}
    for phase in PHASES:
        out[phase] = sum(m.get(f"timing/{phase}", 0.0) for m in ms) / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--order", default="sync,async")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    configure_process()
    from models.bootstrap import ensure_models

    import ray

    base = ["trainer.progress_bar=false", "trainer.image_every=0", "trainer.checkpoint_every=0", "trainer.eval_every=0",
            f"trainer.total_steps={args.steps + 1}", *args.overrides]
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", base)
    ensure_models(cfg)
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    results: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
    try:
        for i, mode in enumerate(args.order.split(",")):
            k = args.k if mode == "async" else 0
            cfg = load_config(ROOT / "configs/grpo_random_local.yaml",
                              [*base, f"trainer.max_staleness={k}", f"output_dir=runs/bench_async/{i}_{mode}"])
            results[mode].append(run(cfg, args.steps))
    finally:
        ray.shutdown()
    cores = os.cpu_count() or 1
    mean = {mode: {key: sum(r[key] for r in rs) / len(rs) for key in rs[0]} for mode, rs in results.items() if rs}
    print(f"machine: {cores} cores; {args.steps} timed steps per run after a warm-up; order {args.order}; "
          f"B x G = {cfg.grpo.prompts_per_step} x {cfg.grpo.group_size}; async k = {args.k}")
    print(f"{'mode':<7}{'step s':>8}{'samples/s':>11}{'busy core-s':>13}{'staleness':>11}  "
          + " ".join(f"{p:>8}" for p in PHASES))
    for mode, r in mean.items():
        print(f"{mode:<7}{r['step_s']:>8.2f}{r['samples_per_s']:>11.2f}{r['busy_per_step']:>13.2f}"
              f"{r['staleness_max']:>11.0f}  " + " ".join(f"{r[p]:>8.2f}" for p in PHASES))
    if "sync" in mean and "async" in mean:
        s = mean["sync"]
        work = min(s["busy_per_step"], mean["async"]["busy_per_step"])
        bound = max(work / cores, s["rollout"] + s["reward"], s["learner"] + s["sync"])
        print(f"ratio async / sync samples/s: {mean['async']['samples_per_s'] / s['samples_per_s']:.2f}x")
        print(f"limit here: sync step {s['step_s']:.2f} s / max(work {work:.2f} core-s / {cores}, "
              f"rollout+reward {s['rollout'] + s['reward']:.2f} s, learner+sync {s['learner'] + s['sync']:.2f} s) "
              f"= {s['step_s'] / bound:.2f}x")


if __name__ == "__main__":
    main()
