"""Weight sync into vLLM, side by side in one run: the ways new policy weights reach a vLLM engine whose EngineCore
runs in its own process (``rollout.vllm.in_process: false``, as the cluster runs it), at the tiny policy and at a
~100M-parameter one.

    PYTHONPATH=. python benchmarks/bench_vllm_sync.py [--sizes tiny,100M] [--repeats 3]

Paths (this process is the rollout actor holding the ``LLM``; a second process is learner rank 0):
- transfer: vLLM's weight-transfer API, ``cpu_gloo`` engine: every vLLM worker receives the packed buckets from
  learner rank 0 and loads each as it arrives (``learner.sync_backend: collective`` now);
- actor+bytes: the weights broadcast to the actor (``core.weight_broadcast``), which then hands them to the worker as
  serialised buckets (the collective sync before vLLM's API: the actor held the whole model);
- bytes: serialised buckets handed to the worker one ``update_weights`` each (the object store's path, after the
  actor fetched them; ``bench_weight_sync.py`` measures the fetch);
- adapters: ``policy.lora.sync: adapters``: the LoRA adapters (rank 8 on every projection) and the saved final norm
  alone, served by vLLM's LoRA, against the merged weights through bytes.
Per path: seconds per sync (best of ``--repeats`` after a warm-up), MiB moved, and the largest block the receiving
side holds at once; then vLLM's decode tokens/s with the adapter against the merged weights.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {  # TinyPolicyConfig overrides: the embedded default's policy, and a ~100M one (vocab 32k)
    "tiny": {},
    "100M": dict(hidden_size=768, intermediate_size=3072, num_layers=8, num_heads=12, num_kv_heads=4,
                 vocab_size=32000, embedding_rows=32768),
}
BUCKET = 64 << 20  # learner.sync_bucket_mb's default
LORA = dict(rank=8, alpha=16, target_modules=[r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$"],
            modules_to_save=[r"language_model\.norm$"])


def _learner(conn, path: str) -> None:
    """Learner rank 0 in its own process: opens the groups it is asked to and sends the perturbed weights."""
    from core import weight_broadcast
    from learner.transfer import open_sender, update_info
    from models.policy import load_policy

    torch.set_num_threads(1)
    state = {n: t + 0.01 for n, t in load_policy(path).state_dict().items()}
    sender = group = None
    while True:
        cmd, arg = conn.recv()
        if cmd == "open_transfer":
            conn.send("listening")
            sender = open_sender("cpu_gloo", arg)
        elif cmd == "open_group":
            conn.send("listening")
            group = weight_broadcast.open_group(*arg)
        elif cmd == "info":
            conn.send(update_info(state.items()))
            continue
        elif cmd == "transfer":
            sender.send(state.items(), arg)
        elif cmd == "broadcast":
            weight_broadcast.broadcast_weights(group, state.items(), BUCKET)
        elif cmd == "stop":
            return
        conn.send("done")


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _tokens_per_s(engine, requests) -> float:
    from core.config import SamplingConfig

    start = time.perf_counter()
    out = engine.generate(requests, SamplingConfig(temperature=1.0, seed=0))
    return sum(len(s.token_ids) for o in out for s in o) / (time.perf_counter() - start)


def measure(name: str, overrides: dict, repeats: int, root: Path) -> dict[str, float]:
    import threading

    from actors.text_engine import TextEngineSpec, TextRequest
    from actors.vllm_engine import BLOB_BUCKET_BYTES, VLLMTextEngine
    from core import weight_broadcast
    from core.config import SamplingConfig, TinyPolicyConfig, VLLMConfig
    from core.model_config import LoraConfig
    from core.weights import bucket_named_tensors, serialize_bucket
    from models import lora
    from models.policy import load_policy
    from models.tiny import build_tiny_policy

    path = build_tiny_policy(TinyPolicyConfig(**overrides), root / name)
    learner = load_policy(path)
    merged = {n: t + 0.01 for n, t in learner.state_dict().items()}
    mib = lambda state: sum(t.numel() * t.element_size() for t in state.values()) / 2**20  # noqa: E731
    out: dict[str, float] = {"params_m": sum(p.numel() for p in learner.parameters()) / 1e6, "mb": mib(merged)}
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_learner, args=(child, str(path)), daemon=True)
    proc.start()

    def answer():
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise RuntimeError(f"the learner process died (exit code {proc.exitcode})")
        return conn.recv()

    def call(cmd, arg=None):
        conn.send((cmd, arg))
        return answer()

    sampling = SamplingConfig(temperature=1.0, seed=0)
    engine = VLLMTextEngine(TextEngineSpec(path, sampling, 32, transfer="cpu_gloo", vllm=VLLMConfig(in_process=False)))
    try:
        from learner.transfer import transfer_init

        init = transfer_init("cpu_gloo", "127.0.0.1", _port(), 2, BUCKET, 120)
        conn.send(("open_transfer", init))
        answer()
        engine.join_transfer({**init, "rank_offset": 1})
        answer()
        info = call("info")

        def transfer() -> None:
            receiving = threading.Thread(target=engine.receive, args=(info, 1))
            receiving.start()
            call("transfer", info)
            receiving.join()

        out["transfer_s"] = _best(transfer, repeats)
        out["transfer_held_mb"] = max(s["peak_chunk_bytes"] for s in engine.transfer_stats()) / 2**20
    finally:
        engine.close()
    # the collective before vLLM's API: to the actor, then serialised buckets into the worker (an engine of its own:
    # an engine takes weights through one transfer backend)
    engine = VLLMTextEngine(TextEngineSpec(path, sampling, 32, vllm=VLLMConfig(in_process=False)))
    try:
        port = _port()
        conn.send(("open_group", ("127.0.0.1", port, 0, 2, "gloo", 120)))
        answer()
        group = weight_broadcast.open_group("127.0.0.1", port, 1, 2, "gloo", 120)
        answer()
        held: dict[str, float] = {}

        def actor_bytes() -> None:
            conn.send(("broadcast", None))
            received = list(weight_broadcast.receive_weights(group))  # the actor held the whole model
            held["mb"] = sum(t.numel() * t.element_size() for _, t in received) / 2**20
            answer()
            engine.load_weights(received, 2)

        out["actor_bytes_s"] = _best(actor_bytes, repeats)
        out["actor_bytes_held_mb"] = held["mb"]
    finally:
        if proc.is_alive():
            conn.send(("stop", None))
        proc.join(timeout=60)
        engine.close()
    # bytes, merged vs adapters: two engines without a transfer group
    cfg = LoraConfig(**LORA)
    adapted = load_policy(path)
    scalings = lora.add_lora(adapted, cfg, "policy.lora")
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if lora.is_trained(n):
                p.add_(0.01)
    raw = {n: t.detach().clone() for n, t in adapted.state_dict().items()}
    shipped = {"merged": lora.merge_lora(raw, scalings), "adapters": lora.trained_state(raw)}
    rng = np.random.default_rng(0)
    for mode in ("merged", "adapters"):
        engine = VLLMTextEngine(TextEngineSpec(path, sampling, 64, vllm=VLLMConfig(in_process=False),
                                               lora=cfg if mode == "adapters" else None, max_loras=2))
        try:
            t = engine.tokens
            images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
            requests = [TextRequest(t.prompt_ids(im), [im], [t.stop_ids["rough"]], n=2, max_tokens=64)
                        for im in images]
            version = iter(range(1, 100))
            out[f"{mode}_s"] = _best(lambda: engine.load_weights(shipped[mode].items(), next(version)), repeats)
            out[f"{mode}_mb"] = mib(shipped[mode])
            out[f"{mode}_held_mb"] = max(
                (len(serialize_bucket(b)) for b in bucket_named_tensors(shipped[mode].items(), BLOB_BUCKET_BYTES)),
                default=0) / 2**20
            _tokens_per_s(engine, requests)  # warm-up
            out[f"{mode}_tok_s"] = float(np.median([_tokens_per_s(engine, requests) for _ in range(repeats)]))
        finally:
            engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,100M")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes.split(","):
            rows.append((name, measure(name, SIZES[name], args.repeats, Path(tmp))))
    print(f"weight sync into vLLM (EngineCore in its own process), float32, {os.cpu_count()} cores, best of "
          f"{args.repeats} after a warm-up; held: the largest block the receiving side holds at once")
    print(f"{'model':<6}{'params':>8} {'path':<13}{'MiB':>9}{'s':>9}{'held MiB':>10}{'vs transfer':>13}")
    for name, r in rows:
        for path, key in (("transfer", "transfer"), ("actor+bytes", "actor_bytes"), ("bytes merged", "merged"),
                          ("adapters", "adapters")):
            mb = r["mb"] if key in ("transfer", "actor_bytes") else r[f"{key}_mb"]
            print(f"{name:<6}{r['params_m']:>7.1f}M {path:<13}{mb:>9.2f}{r[f'{key}_s']:>9.3f}"
                  f"{r[f'{key}_held_mb']:>10.2f}{r[f'{key}_s'] / r['transfer_s']:>12.2f}x")
        print(f"{name:<6}{'':>8} adapters/merged: {r['adapters_mb'] / r['merged_mb']:.3f}x the bytes, "
              f"{r['adapters_s'] / r['merged_s']:.2f}x the seconds; decode {r['adapters_tok_s']:.0f} tok/s with the "
              f"adapter vs {r['merged_tok_s']:.0f} merged ({r['adapters_tok_s'] / r['merged_tok_s']:.2f}x)")


if __name__ == "__main__":
    main()
