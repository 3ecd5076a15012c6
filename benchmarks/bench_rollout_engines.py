"""Rollout throughput of the vLLM engine vs the HF ``generate`` engine on the same tiny policy and prompts,
measured side by side in one run (alternating repeats, median), for text turns alone and for whole VLCoT
chains (text + SR diffusion stages, the diffusion part identical for both).

    python benchmarks/bench_rollout_engines.py [--prompts 4] [--group 4] [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import load_config  # noqa: E402
from core.env import configure_process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    configure_process()
    from actors.chain_sampler import ChainSampler
    from actors.engines import build_text_engine
    from actors.text_engine import TextEngineSpec, TextRequest
    from core.chain import TURNS
    from data.dataset import PairDataset
    from models.bootstrap import ensure_models
    from models.sr_pipeline import SRPipeline

    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", args.overrides)
    ensure_models(cfg)
    samples = PairDataset(cfg.data, "train").batch(0, args.prompts)
    pipeline = SRPipeline.from_pretrained(cfg.diffusion.path)
    spec = TextEngineSpec(cfg.policy.path, cfg.rollout.sampling, cfg.chain.max_stage_tokens, vllm=cfg.rollout.vllm,
                          dtype=cfg.policy.dtype, seed=0)
    engines = {name: build_text_engine(name, spec) for name in ("vllm", "hf")}

    def text_turn(engine) -> int:
        stop = [engine.tokens.stop_ids[TURNS[0].stage]]
        reqs = [TextRequest(engine.tokens.prompt_ids(s.lr), [s.lr], stop, n=args.group, seed=i)
                for i, s in enumerate(samples)]
        return sum(len(x.token_ids) for group in engine.generate(reqs) for x in group)

    def chains(engine) -> int:
        sampler = ChainSampler(engine, pipeline, cfg.chain, cfg.diffusion)
        return sum(int(r.text_mask.sum()) for r in sampler.sample(samples, args.group, seed=1))

    results: dict[tuple[str, str], list[float]] = {}
    for kind, fn in (("text turn", text_turn), ("whole chain", chains)):
        for name, engine in engines.items():
            fn(engine)  # warm-up
        for _ in range(args.repeats):
            for name, engine in engines.items():
                t0 = time.perf_counter()
                tokens = fn(engine)
                dt = time.perf_counter() - t0
                results.setdefault((kind, name), []).append(dt)
                results.setdefault((kind, name + "/tokens"), []).append(tokens / dt)
    n = args.prompts * args.group
    print(f"machine: {os.cpu_count()} CPUs; {args.prompts} prompts x {args.group} samples, "
          f"max {cfg.chain.max_stage_tokens} tokens per turn; median of {args.repeats} alternating repeats")
    print(f"{'what':<13}{'engine':<7}{'seconds':>9}{'chains/s':>10}{'tokens/s':>10}")
    for kind in ("text turn", "whole chain"):
        for name in engines:
            sec = statistics.median(results[(kind, name)])
            tps = statistics.median(results[(kind, name + "/tokens")])
            print(f"{kind:<13}{name:<7}{sec:>9.2f}{n / sec:>10.2f}{tps:>10.1f}")
        ratio = statistics.median(results[(kind, "hf")]) / statistics.median(results[(kind, "vllm")])
        print(f"{kind}: vLLM / HF throughput ratio = {ratio:.2f}x")


if __name__ == "__main__":
    main()
