"""The collective weight sync's wire (``learner.sync_backend: collective``): learner rank 0 broadcasts bucketed
weights to every rollout actor over a process group of their own (gloo on CPU, NCCL on GPU), no Ray object store
in between. Plain torch.distributed; the Ray shells open the group on each member and call these functions.

The group is separate from the learner's ZeRO group (``torch.distributed``'s default group): it is built from
its own TCPStore, so opening, closing or losing it never touches the learner's collectives (OpenRLHF and vLLM
open their weight-sync groups the same way). One sync is

    root:      header = [[name, dtype, shape], ...] per bucket  ->  broadcast len, header bytes
               per bucket: the tensors' bytes, 16-byte aligned  ->  broadcast one uint8 buffer
    receivers: the same broadcasts, then the buckets' tensors rebuilt as views of the received buffer

so a bucket costs one collective, whatever its number of tensors. Every member must make the same calls; a
member that died makes the others fail (connection closed) or time out after ``timeout_s``, never hang.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from core.rendezvous import tcp_store
from core.weights import Bucket, NamedTensor, WeightSyncStats, bucket_named_tensors

# dtypes a state dict holds, by the name the header carries (buffers included: position ids, counters, masks)
WIRE_DTYPES = {name: getattr(torch, name) for name in
               ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}
_WIRE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}


class SyncGroupError(RuntimeError):
    """A collective weight sync failed (a member died or timed out); the message names the member."""


def open_group(host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
               timeout_s: float = 60.0) -> dist.ProcessGroup:
    """This member's handle of a weight-sync group of ``world_size`` (rank 0 = learner rank 0, which hosts the
    store on ``host:port``). Blocks until every member joined, or raises after ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = tcp_store(host, port, world_size, rank == 0, timeout)  # rank 0 listens on host only
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"weight-sync backend {backend!r}: must be gloo or nccl")


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


ALIGN = 16  # every tensor starts at a multiple of this in a bucket's buffer, so it can be viewed as its dtype


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, zero-padded to ``ALIGN``."""
    t = tensor.detach().contiguous().reshape(-1)
    raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)
    pad = _aligned(raw.numel()) - raw.numel()
    return torch.cat([raw, raw.new_zeros(pad)]) if pad else raw


def broadcast_weights(group: dist.ProcessGroup, named_tensors: Iterable[NamedTensor], bucket_bytes: int,
                      dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> WeightSyncStats:
    """Root (rank 0): send ``named_tensors`` (cast to ``dtype`` when floating) in buckets of <= bucket_bytes."""
    stats = WeightSyncStats()
    with stats.timed():
        buckets: list[Bucket] = list(bucket_named_tensors(named_tensors, bucket_bytes, dtype))
        header = [[[name, _WIRE_NAMES[t.dtype], list(t.shape)] for name, t in b] for b in buckets]
        raw = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8).to(device)
        _broadcast(group, torch.tensor([raw.numel()], dtype=torch.int64, device=device))
        _broadcast(group, raw)
        for bucket in buckets:
            payload = torch.cat([_as_bytes(t.to(device)) for _, t in bucket])
            _broadcast(group, payload)
            stats.add_bucket(bucket)
    return stats


def receive_weights(group: dist.ProcessGroup, device: str | torch.device = "cpu") -> Iterator[NamedTensor]:
    """Receivers: the root's named tensors, in its order, a bucket at a time (each a view of its buffer)."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(group, size)
    raw = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _broadcast(group, raw)
    header = json.loads(bytes(raw.cpu().numpy()).decode())
    for bucket in header:
        shapes = [(name, WIRE_DTYPES[dt], shape) for name, dt, shape in bucket]
        sizes = [_numel(shape) * torch.empty(0, dtype=dt).element_size() for _, dt, shape in shapes]
        payload = torch.empty(sum(_aligned(n) for n in sizes), dtype=torch.uint8, device=device)
        _broadcast(group, payload)
        offset = 0
        for (name, dt, shape), nbytes in zip(shapes, sizes):
            yield name, payload[offset:offset + nbytes].view(dt).reshape(shape)
            offset += _aligned(nbytes)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
