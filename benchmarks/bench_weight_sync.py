"""Weight sync: collective broadcast (learner.sync_backend: collective) vs the Ray object store (object_store),
from one root to R receivers, measured side by side in one run.

    PYTHONPATH=. python benchmarks/bench_weight_sync.py [--receivers 2] [--sizes tiny,100M] [--repeats 3]

Each side runs the project's own wire, end to end from the root's full state to the receivers' parameters:
- object_store: ``core.weights`` safetensors buckets put in the object store by the root (``learner.persistence
  .serialized_state``), fetched and deserialised by every receiver (``RolloutWorker.load_weights``);
- collective: ``core.weight_broadcast.broadcast_weights`` over a gloo group of root + receivers, each
  receiver rebuilding the tensors from the buckets it received (``RolloutWorker.receive_weights``);
and both copy every tensor into the receiver's preallocated parameters (what an engine's load_weights does).
The models are random transformer-shaped state dicts: ``tiny`` (3.1 M, 12 MiB: the embedded default's policy + SR model sync 11 MiB a step) and
``100M`` (hidden 768, 9 layers, vocab 32k: 110 M parameters). Sides alternate, best of ``--repeats``; compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch

from core import weight_broadcast as wb
from core.weights import bucket_named_tensors, deserialize_bucket, serialize_bucket

SIZES = {"tiny": (256, 2, 4096), "100M": (768, 9, 32000)}  # hidden, layers, vocab (tied head): 3.1 M, 110 M
BUCKET_BYTES = 256 << 20  # learner.sync_bucket_mb's default


def state_dict(hidden: int, layers: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-shaped float32 state dict: embeddings (tied with the head), per layer q/k/v/o + gate/up/down (4x
    wide) + two norms, a final norm."""
    g = torch.Generator().manual_seed(seed)
    h, f = hidden, 4 * hidden
    shapes = {"embed_tokens.weight": (vocab, h), "norm.weight": (h,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "q.weight": (h, h), p + "k.weight": (h, h), p + "v.weight": (h, h), p + "o.weight": (h, h),
                       p + "gate.weight": (f, h), p + "up.weight": (f, h), p + "down.weight": (h, f),
                       p + "norm1.weight": (h,), p + "norm2.weight": (h,)})
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


@ray.remote
class Root:
    def __init__(self, size: tuple[int, int, int]):
        torch.set_num_threads(1)
        self.state = state_dict(*size, seed=1)
        self.group = None

    def address(self) -> tuple[str, int]:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return "127.0.0.1", s.getsockname()[1]

    def join(self, host: str, port: int, world: int) -> None:
        self.group = wb.open_group(host, port, 0, world, "gloo", 120)

    def serialized(self) -> list[bytes]:
        return [serialize_bucket(b) for b in bucket_named_tensors(self.state.items(), BUCKET_BYTES)]

    def broadcast(self) -> float:
        return wb.broadcast_weights(self.group, self.state.items(), BUCKET_BYTES).num_bytes

    def checksum(self) -> float:
        return float(sum(t.double().sum() for t in self.state.values()))


@ray.remote
class Receiver:
    def __init__(self, size: tuple[int, int, int]):
        torch.set_num_threads(1)
        self.state = {n: torch.zeros_like(t) for n, t in state_dict(*size).items()}
        self.group = None

    def join(self, host: str, port: int, rank: int, world: int) -> None:
        self.group = wb.open_group(host, port, rank, world, "gloo", 120)

    def load(self, blobs: list[bytes]) -> None:
        self._copy(nt for blob in blobs for nt in deserialize_bucket(blob))

    def receive(self) -> None:
        self._copy(wb.receive_weights(self.group))

    def _copy(self, named) -> None:
        for name, tensor in named:
            self.state[name].copy_(tensor)

    def checksum(self) -> float:
        return float(sum(t.double().sum() for t in self.state.values()))


def measure(size: tuple[int, int, int], receivers: int, repeats: int) -> dict[str, float]:
    root = Root.remote(size)
    subs = [Receiver.remote(size) for _ in range(receivers)]
    host, port = ray.get(root.address.remote())
    world = 1 + receivers
    ray.get([root.join.remote(host, port, world)] + [r.join.remote(host, port, i + 1, world) for i, r in enumerate(subs)])

    def object_store() -> None:
        blobs = root.serialized.remote()
        ray.get([r.load.remote(blobs) for r in subs])
        del blobs

    def collective() -> None:
        ray.get([root.broadcast.remote()] + [r.receive.remote() for r in subs])

    times: dict[str, list[float]] = {"object_store": [], "collective": []}
    for _ in range(repeats + 1):  # the first round warms up (connections, allocator)
        for name, fn in (("object_store", object_store), ("collective", collective)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    want = ray.get(root.checksum.remote())
    got = ray.get([r.checksum.remote() for r in subs])
    assert all(abs(g - want) <= 1e-6 * max(1.0, abs(want)) for g in got), (want, got)
    nbytes = sum(t.numel() * t.element_size() for t in state_dict(*size).values())
    for actor in [root, *subs]:
        ray.kill(actor)
    params = sum(t.numel() for t in state_dict(*size).values())
    return {"mb": nbytes / 2**20, "params_m": params / 1e6, **{k: min(v[1:]) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--sizes", default="tiny,100M")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=max(4, args.receivers + 1), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        print(f"weight sync: 1 root -> {args.receivers} receivers, float32, buckets of {BUCKET_BYTES >> 20} MiB, "
              f"gloo, {os.cpu_count()} cores, best of {args.repeats} after a warm-up round")
        print(f"{'model':<7}{'params':>9}{'MiB':>9}{'object store s':>16}{'collective s':>14}"
              f"{'object/collective':>19}")
        for name in args.sizes.split(","):
            r = measure(SIZES[name], args.receivers, args.repeats)
            print(f"{name:<7}{r['params_m']:>8.1f}M{r['mb']:>9.1f}{r['object_store']:>16.3f}{r['collective']:>14.3f}"
                  f"{r['object_store'] / r['collective']:>18.2f}x")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
