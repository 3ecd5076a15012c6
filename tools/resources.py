"""``python -m tools.resources CONFIG MANIFEST [key=value ...]``: does a run fit a KubeRay cluster manifest?

Prints what the config asks for and what the manifest offers at maxReplicas; exit 0 when it fits, 1 when it
does not (each problem on a line), 2 for a bad config or manifest (a ``rollout.vllm.tensor_parallel_size`` that
does not match ``rollout.num_gpus`` included). With vLLM tensor-parallel on GPUs it also prints how a rollout
actor's bundles are laid out (``core.placement.rollout_layout``). The check itself is ``core.placement``.
"""

from __future__ import annotations

import sys
from typing import Sequence

from core.config import ConfigError, load_config
from core.placement import (
    VLLM_BUNDLE_INDICES,
    cluster_spec,
    describe,
    fits,
    format_bundle,
    node_groups,
    placement_requests,
    rollout_layout,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m tools.resources CONFIG MANIFEST [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args[0], args[2:])
        what, spec = cluster_spec(args[1])
        groups = node_groups(spec)
    except (ConfigError, ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    requests = placement_requests(cfg)
    print(f"{args[0]} asks for ({cfg.ray.placement_strategy}):")
    for line in describe(requests):
        print(f"  {line}")
    layout = rollout_layout(cfg.rollout) if "rollout" in requests else None
    if layout is not None and layout.actors[0].worker_bundles:
        first = layout.actors[0]
        own, worker = layout.bundles[first.bundle], layout.bundles[first.worker_bundles[0]]
        print(f"  rollout actor: its own bundle {format_bundle(own)} (it asks for no GPU), then one "
              f"{format_bundle(worker)} bundle per vLLM tensor-parallel worker (rollout.vllm.tensor_parallel_size = "
              f"{cfg.rollout.vllm.tensor_parallel_size}); actor 0 starts with "
              f"{VLLM_BUNDLE_INDICES}={first.env_vars[VLLM_BUNDLE_INDICES]}")
    print(f"{args[1]} ({what}) offers at maxReplicas:")
    for g in groups:
        print(f"  {g.name}: {g.replicas} x {format_bundle(g.resources)}")
    problems = fits(requests, groups, cfg.ray.placement_strategy)
    for p in problems:
        print(f"DOES NOT FIT: {p}")
    if not problems:
        print("fits")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
