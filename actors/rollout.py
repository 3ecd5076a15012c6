"""RolloutWorker: one text engine + one SR pipeline + the chain sampler, as a plain class (Ray wraps it in
actors/group.py). Every method is a short delegation; environment set-up happens once in ``__init__``."""

from __future__ import annotations

import logging
import threading
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
        self.device = device
        self.sync_group = None  # learner.sync_backend: collective (join_weight_group)
        # collective sync in the asynchronous pipeline: version -> [(model, tensors)] received while a rollout
        # ran, loaded by the first rollout call that carries that version (receive_weights(defer=True))
        self._staged: dict[int, list[tuple[str, list[tuple[str, torch.Tensor]]]]] = {}
        self._staged_lock = threading.Lock()
        self.engine = build_text_engine(
            cfg.rollout.engine, cfg.policy.path, cfg.rollout.sampling, cfg.chain.max_stage_tokens,
            vllm=cfg.rollout.vllm, dtype=cfg.policy.dtype, device=device, seed=cfg.trainer.seed + worker_index,
        )
        self.pipeline = SRPipeline.from_pretrained(cfg.diffusion.path).to(device, torch_dtype(cfg.diffusion.dtype))
        self.sampler = ChainSampler(self.engine, self.pipeline, cfg.chain, cfg.diffusion,
                                    image_group_size=cfg.grpo.image_group_size,
                                    detail_gain_std=cfg.grpo.detail_gain_std)
        self.policy_version = 0
        self.diffusion_version = 0

    # ------------------------------------------------------------------------------------------ rollout
    def generate(self, samples: Sequence[Sample], group_size: int, seed: int,
                 weights: WeightUpdate | None = None, explore: bool = True) -> list[Rollout]:
        """B samples -> B*G rollouts; first loads ``weights`` if this worker is behind (after a restart, or the
        asynchronous pipeline's update carried by the call, whose weights were staged by ``receive_weights``).
        ``explore`` False: without ``grpo.detail_gain_std``'s gains (held-out evaluation)."""
        if weights is not None:
            self._load_staged(weights.version)
        if weights is not None and weights.version > max(self.policy_version, self.diffusion_version):
            log.info("rollout worker %d at version %d loads version %d before sampling",
                     self.worker_index, max(self.policy_version, self.diffusion_version), weights.version)
            self.load_weights(weights)
        return self.sampler.sample(samples, group_size, seed, self.policy_version, self.diffusion_version, explore)

    def generate_with_views(self, samples: Sequence[Sample], group_size: int, seed: int,
                            weights: WeightUpdate | None = None, explore: bool = True) -> list:
        """``generate``, then each rollout's scoring view: [r_0 .. r_n-1, view_0 .. view_n-1] (2n returns)."""
        rollouts = self.generate(samples, group_size, seed, weights, explore)
        return rollouts + [r.scoring_view() for r in rollouts]

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

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> int:
        """Join the collective weight-sync group (learner rank 0 is its root) as member ``rank``."""
        from core import weight_broadcast

        self.sync_group = weight_broadcast.open_group(host, port, rank, world_size, backend, timeout_s)
        return rank

    def receive_weights(self, models: Sequence[str], version: int, defer: bool = False) -> dict[str, float]:
        """Receive ``models`` ("policy", "diffusion", in the learner's order) from the weight-sync group's root:
        the collective twin of ``load_weights``. ``defer``: keep them for the first rollout call that carries
        ``version`` (the asynchronous pipeline, where this runs beside a rollout in the actor's "weights"
        thread); otherwise load them now."""
        from core import weight_broadcast

        if self.sync_group is None:
            raise RuntimeError(f"rollout worker {self.worker_index} is not in the weight-sync group (restarted?)")
        start = time.perf_counter()
        received = [(model, list(weight_broadcast.receive_weights(self.sync_group, self.device))) for model in models]
        receive_s = time.perf_counter() - start
        with self._staged_lock:
            if defer:
                self._staged[version] = received
            else:
                self._load_received(received, version)
        return {"receive_s": receive_s, "load_s": time.perf_counter() - start - receive_s, "version": float(version)}

    def _load_staged(self, upto: int) -> None:
        """Load the newest staged weights of a version <= ``upto`` (older staged ones are dropped)."""
        with self._staged_lock:
            ready = [v for v in self._staged if v <= upto]
            if not ready:
                return
            newest = max(ready)
            received = self._staged[newest]
            for v in ready:
                del self._staged[v]
            self._load_received(received, newest)

    def _load_received(self, received: Sequence[tuple[str, list[tuple[str, torch.Tensor]]]], version: int) -> None:
        for model, tensors in received:
            if model == "policy":
                self.engine.load_weights(tensors, version)
                self.policy_version = version
            else:
                self.load_diffusion_state(tensors)
                self.diffusion_version = version

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

    def named_weights(self, model: str) -> dict[str, torch.Tensor]:
        """The weights this actor samples with, by the learner's names ("policy": the HF engine's parameters;
        "diffusion": ``unet.*`` / ``text_encoder.*``): to check that a sync delivered them."""
        if model == "diffusion":
            return {f"{part}.{k}": v for part in ("unet", "text_encoder")
                    for k, v in getattr(self.pipeline, part).state_dict().items()}
        hf_model = getattr(self.engine, "model", None)
        if hf_model is None:
            raise NotImplementedError(f"{type(self.engine).__name__} keeps the policy in its own (fused) layout; "
                                      "rollout.engine: hf exposes it by the learner's names")
        return dict(hf_model.named_parameters())

    def versions(self) -> tuple[int, int]:
        return self.policy_version, self.diffusion_version

    def ping(self) -> int:
        return self.worker_index


def _stream(objects: Sequence) -> Iterable[tuple[str, torch.Tensor]]:
    """Tensors of serialised buckets; each resolved object is one bucket (bytes) or a list of them."""
    for obj in objects:
        for blob in ([obj] if isinstance(obj, (bytes, bytearray)) else obj):
            yield from deserialize_bucket(blob)
