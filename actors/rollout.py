"""RolloutWorker: one text engine + one SR pipeline + the chain sampler, as a plain class (Ray wraps it in
actors/group.py). Every method is a short delegation; environment set-up happens once in ``__init__``."""

from __future__ import annotations

import logging
import time
from typing import Iterable, Sequence

import torch

from actors.chain_sampler import ChainSampler
from actors.engines import build_text_engine
from core.config import ExperimentConfig
from core.dtypes import torch_dtype
from core.env import configure_process
from core.records import Rollout, Sample, WeightUpdate
from core.weights import deserialize_bucket
from models.sr_pipeline import SRPipeline

log = logging.getLogger("actors.rollout")


class RolloutWorker:
    """Generates grouped VLCoT chains with the latest weights it was given."""

    def __init__(self, cfg: ExperimentConfig, worker_index: int = 0):
        configure_process(cfg.rollout.num_cpus)
        device = "cuda" if cfg.rollout.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.worker_index = worker_index
        self.engine = build_text_engine(
            cfg.rollout.engine, cfg.policy.path, cfg.rollout.sampling, cfg.chain.max_stage_tokens,
            vllm=cfg.rollout.vllm, dtype=cfg.policy.dtype, device=device, seed=cfg.trainer.seed + worker_index,
        )
        self.pipeline = SRPipeline.from_pretrained(cfg.diffusion.path).to(device, torch_dtype(cfg.diffusion.dtype))
        self.sampler = ChainSampler(self.engine, self.pipeline, cfg.chain, cfg.diffusion)
        self.policy_version = 0
        self.diffusion_version = 0

    # ------------------------------------------------------------------------------------------ rollout
    def generate(self, samples: Sequence[Sample], group_size: int, seed: int,
                 weights: WeightUpdate | None = None) -> list[Rollout]:
        """B samples -> B*G rollouts; first catches up with ``weights`` if this worker is behind (a restart)."""
        if weights is not None and weights.version > self.policy_version:
            log.warning("rollout worker %d at version %d catches up to %d before sampling",
                        self.worker_index, self.policy_version, weights.version)
            self.load_weights(weights)
        return self.sampler.sample(samples, group_size, seed, self.policy_version, self.diffusion_version)

    # ------------------------------------------------------------------------------------------ weights
    def load_weights(self, update: WeightUpdate) -> dict[str, float]:
        """Load serialised buckets (resolved from the object store here) into the engine and the pipeline."""
        import ray

        start = time.perf_counter()
        if update.policy:
            self.engine.load_weights(_stream(ray.get(list(update.policy))), update.version)
            self.policy_version = update.version
        if update.diffusion:
            self.load_diffusion_state(_stream(ray.get(list(update.diffusion))))
            self.diffusion_version = update.version
        return {"load_s": time.perf_counter() - start, "version": float(update.version)}

    def load_diffusion_state(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Names ``unet.*`` / ``text_encoder.*`` go to those components (strict: every weight must arrive)."""
        parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
        for name, tensor in named_tensors:
            component, _, key = name.partition(".")
            if component not in parts:
                raise KeyError(f"diffusion weight {name!r}: component {component!r} is not unet or text_encoder")
            parts[component][key] = tensor
        for component, state in parts.items():
            if state:
                getattr(self.pipeline, component).load_state_dict(state, strict=True)

    def versions(self) -> tuple[int, int]:
        return self.policy_version, self.diffusion_version

    def ping(self) -> int:
        return self.worker_index


def _stream(objects: Sequence) -> Iterable[tuple[str, torch.Tensor]]:
    """Tensors of serialised buckets; each resolved object is one bucket (bytes) or a list of them."""
    for obj in objects:
        for blob in ([obj] if isinstance(obj, (bytes, bytearray)) else obj):
            yield from deserialize_bucket(blob)
