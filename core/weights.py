"""Weight sync, the pure part: bucketing a named state dict, dtype casting, (de)serialising a bucket.

The learner (rank 0, after gathering ZeRO shards) walks its parameters once, in order, and sends them to
every rollout engine in buckets of at most ``bucket_bytes``: fewer, larger messages than one per tensor
(OpenRLHF's per-parameter broadcast was a known bottleneck), while bounding the extra memory of a bucket.
A bucket travels either as tensors (NCCL broadcast, in-process engine) or as safetensors bytes (through
Ray or vLLM's collective_rpc, which cannot pickle tensors). The receive side is the engine's
``load_weights(named_tensors, version)``; process groups live in the Ray-aware shell, not here.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

NamedTensor = tuple[str, torch.Tensor]
Bucket = list[NamedTensor]

# Key in the safetensors header metadata that stores tensor names in send order (the header itself is a
# JSON object whose key order safetensors does not promise to keep).
ORDER_KEY = "weight_sync.names"


def cast_tensor(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Detached tensor, cast to ``dtype`` if it is floating point. Integer/bool buffers (position ids,
    counters) keep their dtype: casting them would corrupt them."""
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucket_nbytes(bucket: Sequence[NamedTensor]) -> int:
    return sum(tensor_nbytes(t) for _, t in bucket)


def bucket_named_tensors(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[NamedTensor],
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
) -> Iterator[Bucket]:
    """Split named tensors into consecutive buckets of at most ``bucket_bytes`` (sizes after the cast).

    A tensor is never split: one larger than ``bucket_bytes`` travels alone in its own bucket. Order and
    names are kept, so concatenating the buckets gives back the input sequence. A generator: with ZeRO-3
    the caller can gather parameters lazily and memory holds at most one bucket (plus one tensor).
    Raises on a repeated name (the receiver would silently load only one of them).
    """
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    seen: set[str] = set()
    bucket: Bucket = []
    size = 0
    for name, tensor in items:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice in the state dict")
        seen.add(name)
        tensor = cast_tensor(tensor, dtype)
        nbytes = tensor_nbytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def serialize_bucket(bucket: Sequence[NamedTensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Bucket -> safetensors bytes (CPU copies, contiguous). ``metadata`` (str -> str) travels in the
    header, e.g. the policy version; read it back with ``bucket_metadata``.

    Tied weights (two names, one storage, e.g. embed_tokens and lm_head) are copied so safetensors
    accepts them; the receiver gets two equal tensors, as a state dict would give.
    """
    names = [name for name, _ in bucket]
    if len(set(names)) != len(names):
        raise ValueError(f"bucket has repeated names: {names}")
    meta = dict(metadata or {})
    if ORDER_KEY in meta:
        raise ValueError(f"metadata key {ORDER_KEY!r} is reserved")
    meta[ORDER_KEY] = json.dumps(names)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[int, int]] = set()
    for name, tensor in bucket:
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in storages:
            t = t.clone()
        storages.add(key)
        tensors[name] = t
    return _st_save(tensors, metadata=meta)


def bucket_metadata(data: bytes) -> dict[str, str]:
    """The header metadata of serialised bucket bytes (without deserialising the tensors)."""
    if len(data) < 8:
        raise ValueError(f"not a safetensors buffer: {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"corrupt safetensors header: length {header_len} > buffer {len(data) - 8}")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__") or {})


def deserialize_bucket(data: bytes) -> Bucket:
    """safetensors bytes -> [(name, tensor)] in the order they were serialised."""
    tensors = _st_load(data)
    meta = bucket_metadata(data)
    if ORDER_KEY not in meta:
        raise ValueError(f"bucket bytes lack the {ORDER_KEY!r} metadata: not written by serialize_bucket")
    names = json.loads(meta[ORDER_KEY])
    if sorted(names) != sorted(tensors):
        raise ValueError(f"bucket names {names} do not match its tensors {sorted(tensors)}")
    return [(name, tensors[name]) for name in names]


def deserialize_blobs(blobs: Iterable[bytes]) -> Iterator[NamedTensor]:
    """The named tensors of a stream of serialised buckets, one bucket in memory at a time."""
    for blob in blobs:
        yield from deserialize_bucket(blob)


@dataclass
class WeightSyncStats:
    """What one sync moved and how long it took (logged as ``weight_sync/*``)."""

    num_bytes: int = 0
    num_tensors: int = 0
    num_buckets: int = 0
    seconds: float = 0.0

    def add_bucket(self, bucket: Sequence[NamedTensor]) -> None:
        self.num_bytes += bucket_nbytes(bucket)
        self.num_tensors += len(bucket)
        self.num_buckets += 1

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Adds the wall time of the ``with`` body to ``seconds``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    @property
    def gib_per_s(self) -> float:
        return self.num_bytes / 2**30 / self.seconds if self.seconds > 0 else 0.0

    def metrics(self, prefix: str = "weight_sync/") -> dict[str, float]:
        return {
            f"{prefix}bytes": float(self.num_bytes),
            f"{prefix}tensors": float(self.num_tensors),
            f"{prefix}buckets": float(self.num_buckets),
            f"{prefix}seconds": self.seconds,
            f"{prefix}gib_per_s": self.gib_per_s,
        }
