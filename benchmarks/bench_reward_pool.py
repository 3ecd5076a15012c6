"""Reward scoring throughput: a pool of K=2 Ray reward actors vs one in-process RewardWorker, same chains.

    PYTHONPATH=. python benchmarks/bench_reward_pool.py [--chains 64] [--size 256] [--metrics piqe] [--repeats 3]

Both sides score the same chains (``--size`` square final images: real photo crops with noise; 256 px is the
scoring-bound workload, 64 px the embedded default's, where Ray's per-call overhead is of the order of the work). ``--metrics`` is a
comma list of: piqe, entropy (offline classical metrics; piqe is the local config's), topiq_nr (the
cluster's network metric, here with random weights saved to a temporary file and loaded through pyiqa's own
path). After one warm-up call each, the sides are timed alternately (so all see the same load on a shared
machine) and the best of ``--repeats`` is reported; the ratio is measured in this one run. Compare ratios,
not seconds. A third line times the in-process worker with one torch thread, the share each actor gets: on
a machine with few cores the in-process worker already uses them all, and the pool can at best match it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from core.chain import parse_degradation_text, render_chain
from core.config import QualityMetricConfig, RewardConfig
from core.records import DegradationLabels, Rollout, Sample
from rewards.pool import RewardPool
from rewards.worker import RewardWorker


def metric_configs(names: list[str], tmp: str) -> list[QualityMetricConfig]:
    table = {
        "piqe": lambda: QualityMetricConfig(name="piqe", weight=1.0, scale=100.0, lower_better=True),
        "entropy": lambda: QualityMetricConfig(name="entropy", weight=0.25, scale=8.0),
        "topiq_nr": lambda: QualityMetricConfig(
            name="topiq_nr",
            weight=1.0,
            options={"pretrained_model_path": random_topiq_weights(tmp), "backbone_pretrain": False},
        ),
    }
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"--metrics: unknown {unknown}; choose from {sorted(table)}")
    return [table[n]() for n in names]


def random_topiq_weights(tmp: str) -> str:
    """CFANet (topiq_nr's architecture), random weights, saved in pyiqa's {"params": state_dict} layout."""
    import pyiqa

    path = os.path.join(tmp, "cfanet_nr_random.pth")
    if not os.path.exists(path):
        net = pyiqa.create_metric("topiq_nr", device="cpu", pretrained=False, backbone_pretrain=False).net
        torch.save({"params": net.state_dict()}, path)
    return path


def make_chains(n: int, group: int = 4, size: int = 64) -> tuple[list[Rollout], list[Sample]]:
    from skimage import data

    photo = data.astronaut()  # (512, 512, 3)
    rng = np.random.default_rng(0)
    stated = "medium blur, light downsample, heavy noise, light compression, no upsample"
    levels = parse_degradation_text(stated)  # the labels the chains state, so the degradation reward is 1
    text = render_chain(stated, {"rough": "a woman in a space suit", "middle": "a face", "final": "hair"})
    torch.zeros(1)
    rollouts, samples = [], []
    for i in range(n):
        y, x = rng.integers(0, 512 - size + 1, 2)
        final = np.clip(photo[y : y + size, x : x + size] + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(
            np.uint8
        )
        rollouts.append(Rollout.for_scoring(i // group, i % group, text, {"final": final}))
        if i % group == 0:
            sample = Sample(
                prompt_id=i // group,
                image_id="astronaut",
                lr=final[::4, ::4].copy(),
                hr=None,
                tags=("woman", "space suit", "flag"),
                degradation=DegradationLabels(levels, {}),
            )
        samples.append(sample)
    return rollouts, samples


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--metrics", default="piqe")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--actors", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_reward_pool_")
    os.environ.setdefault("TORCH_HOME", tmp)  # nothing is downloaded; keep any cache out of ~/.cache
    metrics = metric_configs(args.metrics.split(","), tmp)
    cfg = RewardConfig(num_actors=args.actors, num_cpus=1.0, metrics=metrics)
    rollouts, samples = make_chains(args.chains, size=args.size)
    pairs = list(zip(rollouts, samples))

    import ray

    ray.init(
        num_cpus=max(2, args.actors), include_dashboard=False, logging_level="ERROR", log_to_driver=False
    )
    try:
        pool = RewardPool(cfg)
        worker = RewardWorker(cfg)
        refs = [ray.put(r) for r in rollouts]  # as a rollout actor would hand them over
        local_scores, pool_scores = worker.score(pairs), pool.score(refs, samples)  # warm-up
        t_local, t_pool, t_one = [], [], []
        threads = torch.get_num_threads()
        for _ in range(args.repeats):  # alternate, so all see the same background load
            t_local.append(timed(lambda: worker.score(pairs)))
            t_pool.append(timed(lambda: pool.score(refs, samples)))
            # one core's worth, as each actor has (Ray sets OMP_NUM_THREADS to the actor's num_cpus)
            torch.set_num_threads(1)
            t_one.append(timed(lambda: worker.score(pairs)))
            torch.set_num_threads(threads)
        pool.shutdown()
    finally:
        ray.shutdown()
    # network metrics differ in the last float bits between batch sizes and thread counts
    assert np.allclose([s.total for s in pool_scores], [s.total for s in local_scores], atol=1e-4), (
        "pool and in-process disagree"
    )

    n, best_local, best_pool = args.chains, min(t_local), min(t_pool)
    print(
        f"reward scoring: {n} chains, {args.size}x{args.size} final images, metrics {args.metrics}, {os.cpu_count()} cores, "
        f"in-process torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    best_one = min(t_one)
    print(f"  in-process RewardWorker          : {best_local * 1e3:8.1f} ms  {n / best_local:8.1f} chains/s")
    print(f"  in-process, 1 torch thread       : {best_one * 1e3:8.1f} ms  {n / best_one:8.1f} chains/s")
    pool_name = f"RewardPool K={args.actors} (1 CPU per actor)"
    print(f"  {pool_name} : {best_pool * 1e3:8.1f} ms  {n / best_pool:8.1f} chains/s")
    print(
        f"  throughput ratio pool / in-process: {best_local / best_pool:.2f}x "
        f"(pool / one-thread process: {best_one / best_pool:.2f}x)"
    )


if __name__ == "__main__":
    main()
