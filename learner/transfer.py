"""The learner's side of vLLM's weight transfer (``learner.sync_backend: collective`` with vLLM serving the policy):
learner rank 0 is rank 0 of a group whose other members are every vLLM worker process of every rollout actor, and
sends the policy in vLLM's packed format, which the workers unpack into their layer-wise reload
(``actors.vllm_worker``).

    init = transfer_init("cpu_gloo", host, port, world_size, bucket_bytes, timeout_s)   # the driver, once
    sender = open_sender("cpu_gloo", init)     # learner rank 0, while the workers join with the same ``init``
    sender.send(state.items(), update_info)    # while the workers run ``update_weights(update_info)``

Senders by vLLM engine name: ``nccl`` is vLLM's own trainer side (its TCP rendezvous and packed NCCL producer, GPU);
``cpu_gloo`` packs with vLLM's ``pack_tensors`` and broadcasts over gloo (CPU). Both check that what they send is
what the update info announced, tensor by tensor, and name the first difference: the workers cut their chunks from
the announcement, so a difference would otherwise hang or load garbage.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch

from core.rendezvous import tcp_store
from core.weights import NamedTensor, WeightSyncStats

NUM_BUFFERS = 2  # vLLM's packed NCCL transfer double-buffers; both sides must use the same number


def transfer_init(backend: str, host: str, port: int, world_size: int, bucket_bytes: int,
                  timeout_s: float) -> dict[str, Any]:
    """The init info every member of the transfer group gets (a worker adds its ``rank_offset``)."""
    info: dict[str, Any] = {"master_address": host, "master_port": port, "world_size": world_size,
                            "packed_buffer_size_bytes": bucket_bytes}
    if backend == "nccl":
        return {**info, "packed": True, "packed_num_buffers": NUM_BUFFERS}
    if backend == "cpu_gloo":
        return {**info, "timeout_s": timeout_s}
    raise ValueError(f"weight-transfer backend {backend!r}: must be nccl or cpu_gloo")


def update_info(state: Iterable[NamedTensor]) -> dict[str, list]:
    """What the workers are told to expect: names, dtype names and shapes, in send order (vLLM's update info)."""
    items = list(state)
    return {"names": [n for n, _ in items], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in items],
            "shapes": [list(t.shape) for _, t in items]}


def checked(named_tensors: Iterable[NamedTensor], info: dict[str, list]) -> Iterator[NamedTensor]:
    """``named_tensors``, each checked against ``info`` (``update_info``) as it passes; the first difference is an
    error naming the tensor, and so is a missing or extra one."""
    expected = list(zip(info["names"], info["dtype_names"], info["shapes"]))
    sent = 0
    for name, tensor in named_tensors:
        if sent >= len(expected):
            raise ValueError(f"weight transfer: {name!r} was not announced ({len(expected)} tensors were)")
        want = (expected[sent][0], expected[sent][1], list(expected[sent][2]))
        got = (name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
        if got != want:
            raise ValueError(f"weight transfer: tensor {sent} is {got}, the workers expect {want}")
        sent += 1
        yield name, tensor
    if sent != len(expected):
        raise ValueError(f"weight transfer: {sent} tensors sent, {len(expected)} announced "
                         f"(first missing: {expected[sent][0]!r})")


class Sender(Protocol):
    def send(self, named_tensors: Iterable[NamedTensor], info: dict[str, list]) -> WeightSyncStats: ...

    def close(self) -> None: ...


class GlooSender:
    """Rank 0 of a gloo group (its TCPStore's host); vLLM's packing rule, one chunk in memory at a time."""

    def __init__(self, init: dict[str, Any]):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=init["timeout_s"])
        self.store = tcp_store(init["master_address"], init["master_port"], init["world_size"], True, timeout)
        self.group = dist.ProcessGroupGloo(self.store, 0, init["world_size"], timeout)
        self.bucket_bytes = init["packed_buffer_size_bytes"]

    def send(self, named_tensors: Iterable[NamedTensor], info: dict[str, list]) -> WeightSyncStats:
        import torch.distributed as dist
        from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

        stats = WeightSyncStats()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        pairs = (((n, t.detach().cpu()) for n, t in checked(named_tensors, info)))
        with stats.timed(), warnings.catch_warnings():
            # a tensor larger than the buffer travels alone, as in vLLM's own transfer: not worth a warning a sync
            warnings.filterwarnings("ignore", message=r"Tensor .* exceeds buffer_size_bytes")
            while (chunk := pack_tensors(pairs, lambda item: item[1], self.bucket_bytes)) is not None:
                self.group.broadcast([chunk.packed_tensor], opts).wait()
                stats.num_bytes += chunk.packed_tensor.numel()
                stats.num_tensors += len(chunk.names)
                stats.num_buckets += 1
        return stats

    def close(self) -> None:
        self.group = None


class NCCLSender:
    """vLLM's own trainer side of its ``nccl`` engine: its TCP rendezvous (``StatelessProcessGroup`` +
    ``PyNcclCommunicator``) and its double-buffered packed producer."""

    def __init__(self, init: dict[str, Any]):
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.comm = trainer_init(init)
        self.bucket_bytes = init["packed_buffer_size_bytes"]

    def send(self, named_tensors: Iterable[NamedTensor], info: dict[str, list]) -> WeightSyncStats:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        stats = WeightSyncStats()

        def counted() -> Iterator[NamedTensor]:
            for name, tensor in checked(named_tensors, info):
                stats.num_bytes += tensor.numel() * tensor.element_size()
                stats.num_tensors += 1
                yield name, tensor.to("cuda", non_blocking=True)

        with stats.timed():
            packed_nccl_broadcast_producer(iterator=counted(), group=self.comm, src=0, post_iter_func=lambda x: x[1],
                                           buffer_size_bytes=self.bucket_bytes, num_buffers=NUM_BUFFERS)
            torch.cuda.current_stream().synchronize()
        stats.num_buckets = -(-stats.num_bytes // self.bucket_bytes)
        return stats

    def close(self) -> None:
        self.comm = None


SENDERS: dict[str, type] = {"cpu_gloo": GlooSender, "nccl": NCCLSender}


def open_sender(backend: str, init: dict[str, Any]) -> Sender:
    """Learner rank 0's end of the transfer group (blocks until every worker joined, or the timeout)."""
    if backend not in SENDERS:
        raise ValueError(f"weight-transfer backend {backend!r}: must be one of {sorted(SENDERS)}")
    return SENDERS[backend](init)
