"""Loading DeepSpeed checkpoints without running code: resume and healing read every rank's shards through this
engine, so a file in the checkpoint folder cannot make a learner rank execute anything (torch's weights-only
unpickler, with the few DeepSpeed types its files hold allowed by name).
"""

from __future__ import annotations

from typing import Any

import torch

# What DeepSpeed's checkpoints hold besides tensors and plain containers, found by loading each ZeRO stage's files
# (fp32 and bf16) with weights_only=True: everything else a checkpoint file names is refused.
CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointRefused(RuntimeError):
    """A checkpoint file names code that a weights-only load does not run (a planted pickle payload, or a DeepSpeed
    version that stores a new type): refused, naming the file."""


def weights_only_checkpoint_engine(config: Any) -> Any:
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` and ``CHECKPOINT_GLOBALS`` allowed
    (DeepSpeed's own loads unpickle anything: whoever can write the checkpoint folder would run code in every rank)."""
    import importlib
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = [getattr(importlib.import_module(name.rpartition(".")[0]), name.rpartition(".")[2])
               for name in CHECKPOINT_GLOBALS]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                reason = next((line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                              str(exc).splitlines()[0])
                raise CheckpointRefused(f"{path}: refused, a weights-only load does not run what it names "
                                        f"({reason.strip()})") from None

    return WeightsOnlyCheckpointEngine(config)
