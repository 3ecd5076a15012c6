"""RolloutWorker: one text engine + one SR pipeline + the chain sampler, as a plain class (Ray wraps it in
actors/group.py). Every method is a short delegation; environment set-up happens once in ``__init__``."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from actors.chain_sampler import ChainSampler
from actors.engines import build_text_engine
from actors.text_engine import TextEngineSpec
from core.config import ExperimentConfig
from core.dtypes import torch_dtype
from core.env import configure_process
from core.records import Rollout, Sample, WeightUpdate
from core.weights import deserialize_blobs
from models import lora
from models.sr_pipeline import SRPipeline

log = logging.getLogger("actors.rollout")


ENGINE_DEAD_EXIT = 75  # the exit status of a rollout actor whose vLLM EngineCore died (Ray restarts it)


def exits_when_the_engine_dies(method: Callable) -> Callable:
    """A vLLM EngineCore that died (killed, out of memory) leaves its actor alive but unable to serve: the actor then
    exits, so Ray restarts it with a fresh engine and re-runs the call (``rollout.max_restarts``), as for any lost
    actor; a collective sync the restarted actor missed fails naming it and is retried after it rejoins."""
    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__):
                log.error("rollout actor %s: its vLLM engine died (%s); exiting so that Ray restarts it",
                          getattr(self, "worker_index", "?"), exc)
                logging.shutdown()
                os._exit(ENGINE_DEAD_EXIT)
            raise
    return wrapped


def ships_adapters(cfg: ExperimentConfig, model: str) -> bool:
    """``<model>.lora.sync: adapters``: syncs carry the adapters alone, and the rollout side holds them too."""
    lora_cfg = getattr(cfg, model).lora
    return lora_cfg is not None and lora_cfg.sync == "adapters"


def transfer_backend(cfg: ExperimentConfig) -> str:
    """The vLLM weight-transfer engine the policy's new weights arrive through (``actors.vllm_worker``): the
    learner's collective (vLLM's ``nccl`` on GPU, the project's ``cpu_gloo`` on CPU), or serialised buckets (the
    object store's, or the few saved-module tensors of an adapter sync, which reach the actor first)."""
    if cfg.learner.sync_backend != "collective" or ships_adapters(cfg, "policy"):
        return "safetensors_bytes"
    return "nccl" if cfg.learner.backend == "nccl" else "cpu_gloo"


def text_engine_spec(cfg: ExperimentConfig, device: str, worker_index: int = 0) -> TextEngineSpec:
    """The text engine of rollout worker ``worker_index``, from the config: its own seed, the transfer backend the
    sync uses, and the policy's adapters when a sync ships them alone (``trainer.max_staleness`` + 1 versions
    served at once)."""
    return TextEngineSpec(
        cfg.policy.path, cfg.rollout.sampling, cfg.chain.max_stage_tokens, vllm=cfg.rollout.vllm,
        dtype=cfg.policy.dtype, device=device, seed=cfg.trainer.seed + worker_index, transfer=transfer_backend(cfg),
        lora=cfg.policy.lora if ships_adapters(cfg, "policy") else None, max_loras=cfg.trainer.max_staleness + 1,
    )


class RolloutWorker:
    """Generates grouped VLCoT chains with the latest weights it was given."""

    def __init__(self, cfg: ExperimentConfig, worker_index: int = 0):
        configure_process(cfg.rollout.num_cpus)
        device = "cuda" if cfg.rollout.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.worker_index = worker_index
        self.device = device
        self.sync_group = None  # learner.sync_backend: collective (join_weight_group): the SR model, an HF policy
        # A rollout and a weight update never overlap: a collective sync first pauses the actor (``pause``: the
        # running rollout finishes, no new one starts), then the weights are loaded as they arrive.
        self._engine_lock = threading.Lock()
        self._paused = False
        self.engine = build_text_engine(cfg.rollout.engine, text_engine_spec(cfg, device, worker_index))
        self.pipeline = SRPipeline.from_pretrained(cfg.diffusion.path).to(device, torch_dtype(cfg.diffusion.dtype))
        # the SR model's trained parts by the learner's names (its TraceScorer's): unet.*, text_encoder.*
        self.sr_parts = nn.ModuleDict({k: getattr(self.pipeline, k) for k in ("unet", "text_encoder")
                                       if getattr(self.pipeline, k, None) is not None})
        self.sr_scalings: dict[str, float] = {}  # adapter sync: the SR model holds the learner's adapters
        if ships_adapters(cfg, "diffusion"):
            self.sr_scalings = lora.add_lora(self.sr_parts, cfg.diffusion.lora, "diffusion.lora")
            self.sr_parts.requires_grad_(False)
        self.sampler = ChainSampler(self.engine, self.pipeline, cfg.chain, cfg.diffusion,
                                    image_group_size=cfg.grpo.image_group_size,
                                    detail_gain_std=cfg.experimental.detail_gain_std)
        self.policy_version = 0
        self.diffusion_version = 0

    # ------------------------------------------------------------------------------------------ rollout
    @exits_when_the_engine_dies
    def generate(self, samples: Sequence[Sample], group_size: int, seed: int,
                 weights: WeightUpdate | None = None, explore: bool = True) -> list[Rollout]:
        """B samples -> B*G rollouts; first loads ``weights`` if this worker is behind and they travel through the
        object store (after a restart, or the asynchronous pipeline's update carried by the call). ``explore``
        False: without ``experimental.detail_gain_std``'s gains (held-out evaluation)."""
        with self._engine_lock:
            if weights is not None and weights.version > max(self.policy_version, self.diffusion_version) \
                    and (weights.policy or weights.diffusion):
                log.info("rollout worker %d at version %d loads version %d before sampling",
                         self.worker_index, max(self.policy_version, self.diffusion_version), weights.version)
                self._load_update(weights)
            return self.sampler.sample(samples, group_size, seed, self.policy_version, self.diffusion_version,
                                       explore)

    def generate_with_views(self, samples: Sequence[Sample], group_size: int, seed: int,
                            weights: WeightUpdate | None = None, explore: bool = True) -> list:
        """``generate``, then each rollout's scoring view: [r_0 .. r_n-1, view_0 .. view_n-1] (2n returns)."""
        rollouts = self.generate(samples, group_size, seed, weights, explore)
        return rollouts + [r.scoring_view() for r in rollouts]

    # ------------------------------------------------------------------------------------------ weights
    @exits_when_the_engine_dies
    def load_weights(self, update: WeightUpdate) -> dict[str, float]:
        """Load object-store buckets into the engine and the pipeline, one bucket at a time."""
        with self._engine_lock:
            return self._load_update(update)

    def _load_update(self, update: WeightUpdate) -> dict[str, float]:
        start = time.perf_counter()
        if update.policy:
            self.engine.load_weight_blobs(_blobs(update.policy), update.version)
            self.policy_version = update.version
        if update.diffusion:
            self.load_diffusion_state(deserialize_blobs(_blobs(update.diffusion)))
            self.diffusion_version = update.version
        return {"load_s": time.perf_counter() - start, "version": float(update.version)}

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> int:
        """Join the actors' collective weight-sync group (learner rank 0 is its root) as member ``rank``: the SR
        model's weights, and the policy's when it is not served by vLLM."""
        from core import weight_broadcast

        self.sync_group = weight_broadcast.open_group(host, port, rank, world_size, backend, timeout_s)
        return rank

    @exits_when_the_engine_dies
    def join_transfer(self, init_info: dict[str, Any]) -> int:
        """Every vLLM worker process of this actor joins the learner's weight-transfer group (vLLM's API)."""
        self.engine.join_transfer(init_info)
        return self.worker_index

    def pause(self, timeout_s: float) -> bool:
        """Wait for the running rollout to finish and start no other until the next ``receive_weights`` (or
        ``resume``): the collective sync then loads each bucket into the engine as it arrives."""
        if not self._paused:
            if not self._engine_lock.acquire(timeout=timeout_s):
                raise TimeoutError(f"rollout worker {self.worker_index}: the running rollout did not finish within "
                                   f"{timeout_s:.0f} s of a weight sync's pause")
            self._paused = True
        return True

    def resume(self) -> None:
        """End a pause without a sync (the sync failed before it reached this actor)."""
        if self._paused:
            self._paused = False
            self._engine_lock.release()

    @exits_when_the_engine_dies
    def receive_weights(self, models: Sequence[str], version: int,
                        policy_update: dict[str, Any] | None = None) -> dict[str, float]:
        """Receive ``models`` ("policy", "diffusion", in the learner's order) from the learner rank 0: the policy
        through vLLM's weight transfer (``policy_update``: its names, dtypes and shapes) when vLLM serves it, and
        otherwise (the SR model, an HF policy) over the actors' group. Loaded bucket by bucket as they arrive, paused or not."""
        from core import weight_broadcast

        if not self._paused:
            self.pause(timeout_s=600.0)
        try:
            start = time.perf_counter()
            for model in models:
                if model == "policy" and policy_update is not None:
                    self.engine.receive(policy_update, version)
                else:
                    if self.sync_group is None:
                        raise RuntimeError(f"rollout worker {self.worker_index} is not in the weight-sync group "
                                           "(restarted?)")
                    self._install(model, weight_broadcast.receive_weights(self.sync_group, self.device), version)
                self._set_version(model, version)
            return {"load_s": time.perf_counter() - start, "version": float(version)}
        finally:
            self.resume()

    def load_state(self, model: str, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """``model``'s weights handed over in this process (``rl.one_process``: the learner's own tensors, nothing
        serialised), loaded in place."""
        with self._engine_lock:
            self._install(model, named_tensors, version)
            self._set_version(model, version)

    def _install(self, model: str, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if model == "policy":
            self.engine.load_weights(named_tensors, version)
        else:
            self.load_diffusion_state(named_tensors)

    def _set_version(self, model: str, version: int) -> None:
        if model == "policy":
            self.policy_version = version
        else:
            self.diffusion_version = version

    @torch.no_grad()
    def load_diffusion_state(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Names ``unet.*`` / ``text_encoder.*`` go to those components, copied in place as they arrive (no
        second copy of the model); strict: every tensor of a component that receives any must arrive (with
        adapter sync: every adapter and saved-module tensor)."""
        targets = self.sr_parts.state_dict(keep_vars=True)
        if self.sr_scalings:
            targets = lora.trained_state(targets)
        seen: set[str] = set()
        for name, tensor in named_tensors:
            component = name.partition(".")[0]
            if component not in ("unet", "text_encoder"):
                raise KeyError(f"diffusion weight {name!r}: component {component!r} is not unet or text_encoder")
            if name not in targets:
                raise KeyError(f"diffusion weight {name!r} is not a tensor of the SR model")
            targets[name].data.copy_(tensor)
            seen.add(name)
        parts = {n.partition(".")[0] for n in seen}
        missing = sorted(n for n in targets if n.partition(".")[0] in parts and n not in seen)
        if missing:
            raise KeyError(f"diffusion weights missing from the update: {missing[:5]} ({len(missing)} in all)")

    def named_weights(self, model: str) -> dict[str, torch.Tensor]:
        """The weights this actor samples with, by the learner's names ("policy": the HF engine's parameters;
        "diffusion": ``unet.*`` / ``text_encoder.*``): to check that a sync delivered them."""
        if model == "diffusion":
            state = self.sr_parts.state_dict()
            return lora.merge_lora(state, self.sr_scalings) if self.sr_scalings else state
        hf_model = getattr(self.engine, "model", None)
        if hf_model is None:
            raise NotImplementedError(f"{type(self.engine).__name__} keeps the policy in its own (fused) layout; "
                                      "rollout.engine: hf exposes it by the learner's names")
        state = dict(hf_model.named_parameters())
        scalings = lora.layer_scalings(hf_model)
        return lora.merge_lora(state, scalings) if scalings else state

    def transfer_stats(self) -> list[dict[str, float]]:
        """The vLLM workers' weight-transfer statistics (the largest chunk each held)."""
        stats = getattr(self.engine, "transfer_stats", None)
        return stats() if stats is not None else []

    def versions(self) -> tuple[int, int]:
        return self.policy_version, self.diffusion_version

    def ping(self) -> int:
        return self.worker_index

    def close(self) -> None:
        """Release the text engine now (a worker built in a driver's own process: rl.one_process, tests)."""
        self.engine.close()


def _blobs(refs: Sequence) -> Iterator[bytes]:
    """The serialised buckets behind object-store refs, fetched one ref at a time (each holds a bucket or a list)."""
    import ray

    for ref in refs:
        obj = ray.get(ref)
        yield from ([obj] if isinstance(obj, (bytes, bytearray)) else obj)
