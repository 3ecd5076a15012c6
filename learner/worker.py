"""One learner rank: the policy and the SR diffusion model under DeepSpeed, and the calls the group fans out.

``LearnerWorker`` is a plain class (no Ray). ``learner.group`` runs N of them as Ray actors forming one ZeRO
group; a test or a single-process run builds one directly (world size 1). Every method that touches model
weights is a collective: every rank must call it, in the same order. The worker only holds the parts, each of
which owns its state:

    learner.policy_model  TrainedPolicy: engine, tokens, reference, KL weight; the text losses
    learner.sr_model      TrainedSR: engine, frozen base model, image objective (learner.image_objectives); the
                          denoising loss
    learner.trained       TrainedModels: the rank's place in the group (learner.rank) and the trained models
    learner.grpo_step     the GRPO update, a function of TrainedModels
    learner.sft_step      the supervised cold start, likewise
    learner.persistence   Checkpointer: full-weight gathers for the rollout actors, HF export, DeepSpeed checkpoints
    learner.batching      ranks' shards, equal micro-batch counts, metric reduction
    learner.engine        DeepSpeed set-up: process group, optimizer, LR schedule, ZeRO-3 gathers
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from core import weight_broadcast
from core.config import DiffusionConfig, ExperimentConfig, GRPOConfig, LearnerConfig, PolicyConfig, SFTConfig
from core.env import configure_process
from core.grpo import TrainBatch, build_train_batch, image_credit, token_credit
from core.records import ChainAdvantage, Rollout
from learner import engine as eng
from learner import grpo_step, sft_step, transfer
from learner.batching import masked_copy
from learner.persistence import Checkpointer
from learner.policy_model import TrainedPolicy
from learner.rank import RankContext
from learner.sr_model import TrainedSR
from learner.trained import TrainedModels


def _numel(params: Iterable[nn.Parameter]) -> int:
    """Elements of ``params`` at full size (a ZeRO-3 partitioned parameter counts all of its elements)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)


class LearnerWorker:
    """One rank of the DeepSpeed learner. Build it with ``from_config`` (or the sub-configs)."""

    def __init__(
        self,
        learner: LearnerConfig,
        policy: PolicyConfig,
        diffusion: DiffusionConfig,
        grpo: GRPOConfig,
        total_steps: int,
        dist_env: Optional[Mapping[str, str]] = None,
        logprob_temperature: float = 1.0,
        sft: Optional[SFTConfig] = None,
    ):
        """``total_steps``: trainer steps of the run (the LR schedule spans total_steps x update_epochs
        optimizer steps; with ``sft``, total_steps: one optimizer step per SFT step). ``dist_env``: RANK /
        WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for this rank (None: already in the environment).
        ``logprob_temperature``: the rollout's sampling temperature (``learner.scoring``). ``sft``: the
        cold-start config; ``sft_step`` needs it (None for a GRPO learner)."""
        self.cfg, self.grpo, self.sft = learner, grpo, sft
        configure_process(learner.num_cpus)  # offline flags, threads: the one place this process is set up
        for key, value in (dist_env or {}).items():
            os.environ[key] = str(value)
        t0 = time.perf_counter()
        self.ctx = RankContext.current(eng.init_distributed(learner.backend), learner.backend)
        self.optimizer_steps = 0
        optimizer_total = max(1, total_steps if sft is not None else total_steps * grpo.update_epochs)
        trained_policy = (None if policy.freeze else
                          TrainedPolicy.build(policy, learner, grpo, self.ctx, optimizer_total, logprob_temperature))
        trained_sr = None if diffusion.freeze else TrainedSR.build(diffusion, learner, grpo, self.ctx, optimizer_total)
        self.models = TrainedModels(self.ctx, trained_policy, trained_sr, learner.micro_batch_size)
        self.checkpointer = Checkpointer(self.models, learner, {"policy": policy.path, "diffusion": diffusion.path})
        # a frozen policy has no tokens to credit: the chain rule keeps the batch layout and is never trained on
        self.credit = token_credit(None if policy.freeze else grpo.token_credit)
        self.image_credit = image_credit(None if diffusion.freeze else grpo.image_credit)
        self.train_steps = (diffusion.train_steps_fraction, diffusion.train_steps_start)  # which steps get a loss
        self.sync_group = None  # the rollout actors' weight-sync group (rank 0, learner.sync_backend: collective)
        self.transfer: Optional[transfer.Sender] = None  # vLLM's weight-transfer group (rank 0, vLLM policy)
        self.setup_seconds = time.perf_counter() - t0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, dist_env: Optional[Mapping[str, str]] = None,
                    **kwargs: Any) -> "LearnerWorker":
        kwargs.setdefault("sft", cfg.sft if cfg.mode == "sft" else None)
        return cls(cfg.learner, cfg.policy, cfg.diffusion, cfg.grpo, cfg.trainer.total_steps, dist_env, **kwargs)

    # ------------------------------------------------------------------ small helpers
    def info(self) -> dict[str, Any]:
        """Who this rank is and what it trains (the group waits on this after start-up)."""
        trained = self.models.trained()
        return {
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "device": str(self.ctx.device),
            "trained": sorted(trained),
            "zero_stage": self.cfg.zero_stage,
            "parameters": {k: _numel(m.engine.module.parameters()) for k, m in trained.items()},
            "trainable_parameters": {k: _numel(p for p in m.engine.module.parameters() if p.requires_grad)
                                     for k, m in trained.items()},
            "lora_layers": {k: len(m.lora) for k, m in trained.items() if m.lora is not None},
            "setup_seconds": self.setup_seconds,
        }

    def engine(self, model: str) -> Any:
        """The DeepSpeed engine of ``model``; a frozen model is an error saying so."""
        return self.models.engine(model)

    # ------------------------------------------------------------------ training
    def train_chains(self, advantages: Sequence[ChainAdvantage], padding: bool, *rollouts: Rollout,
                     version: Optional[int] = None, max_staleness: Optional[int] = None) -> dict[str, float]:
        """The GRPO update on this rank's own chains: the batch is built here from the rollouts (varargs, so Ray
        resolves the refs passed for them), so the driver only ever holds refs. ``padding``: this rank got no
        chain and trains a masked copy (zero loss) to stay in step with the others' collectives."""
        tags = self.models.policy.tags if self.models.policy is not None else None
        batch = build_train_batch(list(rollouts), list(advantages), pad_token_id=self.models.pad_id,
                                  credit=self.credit, tags=tags, train_steps=self.train_steps,
                                  image_credit=self.image_credit)
        if padding:
            batch = masked_copy(batch)
        return self.train_step(batch, *rollouts, version=version, max_staleness=max_staleness)

    def train_step(self, batch: TrainBatch, *rollouts: Rollout, version: Optional[int] = None,
                   max_staleness: Optional[int] = None) -> dict[str, float]:
        """The GRPO update on a built batch (``learner.grpo_step.train_step``); ``version``: the learner's
        policy version before it (stale chains are corrected, those more than ``max_staleness`` versions old
        dropped; None: all on-policy)."""
        metrics = grpo_step.train_step(self.models, self.grpo, batch, rollouts, self.optimizer_steps, version,
                                       max_staleness)
        self.optimizer_steps = int(metrics["optimizer_steps"])
        return metrics

    def sft_step(self, *records: Any) -> dict[str, float]:
        """One supervised step on this rank's ``SFTRecord``s (varargs, so Ray resolves refs)."""
        if self.sft is None:
            raise ValueError("sft_step: this learner was built without the sft config "
                             "(LearnerWorker(..., sft=cfg.sft), or a config with mode: sft)")
        metrics = sft_step.sft_step(self.models, self.sft, records, self.optimizer_steps)
        self.optimizer_steps = int(metrics["optimizer_steps"])
        return metrics

    # ------------------------------------------------------------------ weights and checkpoints
    def serialized_state(self, model: str) -> tuple[list[bytes], dict[str, float]]:
        return self.checkpointer.serialized_state(model)

    def gather_full_state(self, model: str) -> dict[str, torch.Tensor]:
        return self.checkpointer.gather_full_state(model)

    def sync_state(self, model: str) -> dict[str, torch.Tensor]:
        """What a weight sync ships of ``model`` (rank 0): the adapters alone or the merged weights."""
        return self.checkpointer.sync_state(model)[0]

    def join_weight_group(self, host: str, port: int, world_size: int, timeout_s: float) -> int:
        """Rank 0 opens the rollout actors' collective weight-sync group as its root (``core.weight_broadcast``);
        other ranks take no part in it. Returns this rank."""
        if self.ctx.rank == 0:
            self.sync_group = weight_broadcast.open_group(host, port, 0, world_size, self.cfg.backend, timeout_s)
        return self.ctx.rank

    def open_transfer(self, backend: str, init: dict[str, Any]) -> int:
        """Rank 0 opens vLLM's weight-transfer group as its rank 0 (``learner.transfer``), while every vLLM worker
        joins it; other ranks take no part."""
        if self.ctx.rank == 0:
            if self.transfer is not None:
                self.transfer.close()
            self.transfer = transfer.open_sender(backend, init)
        return self.ctx.rank

    def sync_metadata(self, model: str) -> dict[str, list]:
        """Names, dtypes and shapes of what a sync ships of ``model``, in order (no gather, no collective)."""
        return self.checkpointer.sync_metadata(model)

    def broadcast_weights(self, models: Sequence[str], transfer_models: Sequence[str] = (),
                          announced: Optional[dict[str, dict]] = None) -> dict[str, float]:
        """All ranks gather each of ``models`` (a collective under ZeRO-3); rank 0 sends it: the ``transfer_models``
        through vLLM's weight transfer, checked against what the workers were ``announced``
        (``sync_metadata``), the others over the actors' weight-sync group. Returns what rank 0 sent ({} on the
        others)."""
        out: dict[str, float] = {}
        for model in models:
            state, adapter_bytes = self.checkpointer.sync_state(model)
            if self.ctx.rank != 0:
                continue
            if adapter_bytes is not None:  # what shipping the LoRA adapters alone would move
                out[f"weight_sync/{model}_adapter_mb"] = adapter_bytes / 2**20
            if model in transfer_models:
                stats = self.transfer.send(state.items(), (announced or {})[model])
            else:
                stats = weight_broadcast.broadcast_weights(self.sync_group, state.items(),
                                                           self.checkpointer.bucket_bytes, device=self.ctx.device)
            out[f"weight_sync/{model}_mb"] = stats.num_bytes / 2**20
            out[f"weight_sync/{model}_buckets"] = float(stats.num_buckets)
            out[f"weight_sync/{model}_broadcast_s"] = stats.seconds
        return out

    def parameter_digest(self, model: str) -> dict[str, float]:
        return self.checkpointer.parameter_digest(model)

    def export_hf(self, directory: str) -> dict[str, str]:
        return self.checkpointer.export_hf(directory)

    def save_checkpoint(self, directory: str) -> None:
        self.checkpointer.save(directory, self.optimizer_steps)

    def load_checkpoint(self, directory: str) -> None:
        self.optimizer_steps = self.checkpointer.load(directory)
