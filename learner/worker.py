"""One learner rank: the policy and the SR diffusion model under DeepSpeed, and the calls the group fans out.

``LearnerWorker`` is a plain class (no Ray). ``learner.group`` runs N of them as Ray actors forming one ZeRO
group; a test or a single-process run builds one directly (world size 1). Every method that touches model
weights is a collective: every rank must call it, in the same order. The work itself lives in one module per
job, each a set of functions of the worker:

    learner.grpo_step    the GRPO update (text tokens; denoising steps through learner.image_objectives)
    learner.sft_step     the supervised cold start
    learner.persistence  full-weight gathers for the rollout actors, HF export, DeepSpeed checkpoints
    learner.scoring      re-scoring log-probs (policy, SR trajectories)
    learner.batching     ranks' shards, equal micro-batch counts, metric reduction
    learner.engine       DeepSpeed set-up: process group, optimizer, LR schedule, ZeRO-3 gathers
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from core import weight_broadcast
from core.config import DiffusionConfig, ExperimentConfig, GRPOConfig, LearnerConfig, PolicyConfig, SFTConfig
from core.dtypes import torch_dtype
from core.env import configure_process
from core.grpo import ChainTags, TrainBatch, build_train_batch, needs_reference, token_credit
from core.records import ChainAdvantage, Rollout
from learner import engine as eng
from learner import grpo_step, persistence, sft_step, transfer
from learner.batching import masked_copy
from learner.scoring import TraceScorer, load_sr_pipeline
from models import lora

MODELS = ("policy", "diffusion")


def restrict_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter whose name no pattern matches (``re.search``; ``policy.trainable``) and return
    the names left trainable. A pattern that matches no parameter is an error naming it."""
    names = [n for n, _ in model.named_parameters()]
    matched, unmatched = lora.match_names(names, patterns)
    if unmatched:
        raise ValueError(f"policy.trainable: {unmatched} match no parameter of {type(model).__name__}; "
                         f"its names look like {names[:2] + names[-2:]}")
    wanted = set(matched)
    kept = []
    for name, param in model.named_parameters():
        if name not in wanted:
            param.requires_grad_(False)
        elif param.requires_grad:  # (a parameter frozen before stays frozen)
            kept.append(name)
    return kept


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
        from models.chain_tokens import ChainTokens

        self.cfg, self.policy_cfg, self.diffusion_cfg, self.grpo = learner, policy, diffusion, grpo
        self.sft = sft
        self.logprob_temperature = logprob_temperature
        configure_process(learner.num_cpus)  # offline flags, threads: the one place this process is set up
        for key, value in (dist_env or {}).items():
            os.environ[key] = str(value)
        t0 = time.perf_counter()
        self.device = eng.init_distributed(learner.backend)
        self.rank, self.world_size = eng.rank(), eng.world_size()
        self.dtype = torch_dtype(learner.dtype)
        self.optimizer_steps = 0
        optimizer_total = max(1, total_steps if sft is not None else total_steps * grpo.update_epochs)

        self.engines: dict[str, Any] = {}
        self.tokens: Optional[ChainTokens] = None  # the policy's processor + token layout
        self.tags: Optional[ChainTags] = None  # the chain tags' ids, for token credit
        # a frozen policy has no tokens to credit: the chain rule keeps the batch layout and is never trained on
        self.credit = token_credit(None if policy.freeze else grpo.token_credit)
        self.reference: Any = None  # the KL term's frozen policy: a second copy, or the adapters switched off
        self.lora: dict[str, dict[str, float]] = {}  # model -> {adapted layer: scaling}, for the trained adapters
        if not policy.freeze:
            self._set_up_policy(optimizer_total)
        self.pipeline = None
        self.diffusion_reference = None  # the base SR model's SRTraining, frozen (grpo.image_kl_beta > 0)
        if not diffusion.freeze:
            self._set_up_sr_model(optimizer_total)
        self.sync_group = None  # the rollout actors' weight-sync group (rank 0, learner.sync_backend: collective)
        self.transfer: Optional[transfer.Sender] = None  # vLLM's weight-transfer group (rank 0, vLLM policy)
        self.setup_seconds = time.perf_counter() - t0

    def _set_up_policy(self, optimizer_total: int) -> None:
        """The trained policy under DeepSpeed (``policy.trainable``, ``policy.lora``, gradient checkpointing), its
        token layout and tags, and the KL term's frozen reference when ``grpo.kl_beta`` needs one."""
        from models.chain_tokens import ChainTokens
        from models.policy import load_policy

        policy, learner = self.policy_cfg, self.cfg
        self.tokens = ChainTokens.from_pretrained(policy.path)
        self.tags = ChainTags.from_tokens(self.tokens)
        model = load_policy(policy.path, learner.dtype, str(self.device)).train()
        if policy.trainable is not None:
            restrict_trainable(model, policy.trainable)
        if policy.lora is not None:
            self.lora["policy"] = lora.add_lora(model, policy.lora, "policy.lora")
        if policy.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if policy.lora is not None:  # the embeddings are frozen: checkpointed blocks need an input grad
                model.enable_input_require_grads()
        self.engines["policy"] = eng.build_engine(model, learner.policy_optim, learner, optimizer_total,
                                                   "learner.policy_optim")
        if needs_reference(self.grpo.kl_beta):
            self.reference = (lora.BasePolicy(model) if policy.lora is not None else
                              load_policy(policy.path, learner.dtype, str(self.device)).requires_grad_(False))

    def _set_up_sr_model(self, optimizer_total: int) -> None:
        """The SR pipeline, its trained parts (``TraceScorer``: UNet and text encoder, ``diffusion.lora``) under
        DeepSpeed, and the frozen base pipeline when ``grpo.image_kl_beta`` > 0."""
        diffusion, learner = self.diffusion_cfg, self.cfg
        self.pipeline = load_sr_pipeline(diffusion.path)
        self.pipeline.to(self.device)
        for module in self.pipeline.components.values():
            if isinstance(module, nn.Module):  # the VAE and anything outside the TraceScorer stay frozen
                module.requires_grad_(False)
        scorer = TraceScorer(self.pipeline).to(self.dtype).requires_grad_(True).train()
        if diffusion.lora is not None:
            self.lora["diffusion"] = lora.add_lora(scorer, diffusion.lora, "diffusion.lora")
        self.engines["diffusion"] = eng.build_engine(scorer, learner.diffusion_optim, learner, optimizer_total,
                                                      "learner.diffusion_optim")
        if self.grpo.image_kl_beta > 0 and diffusion.lora is not None:
            self.diffusion_reference = lora.BasePipeline(scorer.sr, scorer)
        elif self.grpo.image_kl_beta > 0:
            base = load_sr_pipeline(diffusion.path)
            base.to(self.device)
            frozen = TraceScorer(base).to(self.dtype)  # the trained components' dtype, as above
            for module in base.components.values():
                if isinstance(module, nn.Module):
                    module.requires_grad_(False)
            self.diffusion_reference = frozen.sr

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, dist_env: Optional[Mapping[str, str]] = None,
                    **kwargs: Any) -> "LearnerWorker":
        kwargs.setdefault("sft", cfg.sft if cfg.mode == "sft" else None)
        return cls(cfg.learner, cfg.policy, cfg.diffusion, cfg.grpo, cfg.trainer.total_steps, dist_env, **kwargs)

    # ------------------------------------------------------------------ small helpers
    def info(self) -> dict[str, Any]:
        """Who this rank is and what it trains (the group waits on this after start-up)."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.device),
            "trained": sorted(self.engines),
            "zero_stage": self.cfg.zero_stage,
            "parameters": {k: _numel(e.module.parameters()) for k, e in self.engines.items()},
            "trainable_parameters": {k: _numel(p for p in e.module.parameters() if p.requires_grad)
                                     for k, e in self.engines.items()},
            "lora_layers": {k: len(v) for k, v in self.lora.items()},
            "setup_seconds": self.setup_seconds,
        }

    def engine(self, model: str) -> Any:
        """The DeepSpeed engine of ``model``; a frozen model is an error saying so."""
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if model not in self.engines:
            raise ValueError(
                f"the {model} is frozen (config {model}.freeze = true): the learner does not train "
                "or hold it, so it has no weights to gather or sync"
            )
        return self.engines[model]

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Over the learner's ranks (a collective)."""
        return eng.all_reduce(values, op, self.device if self.cfg.backend == "nccl" else "cpu")

    def validate_shard(self, batch: TrainBatch, rollouts: Sequence[Rollout]) -> None:
        """Check the shard on every rank and agree on the outcome before the first collective, so a bad shard
        on one rank is an error on all ranks instead of a hang in the others' all-reduce."""
        error = None
        try:
            if len(rollouts) != len(batch):
                raise ValueError(f"train_step got {len(batch)} batch rows but {len(rollouts)} rollouts "
                                 "(one per row)")
            for key, r in zip(batch.keys, rollouts):
                if key != (int(r.prompt_id), int(r.sample_index)):
                    raise ValueError(f"batch row {key} is paired with rollout {(r.prompt_id, r.sample_index)}")
            if "policy" in self.engines:
                for row, r in enumerate(rollouts):
                    ids = batch.input_ids[row][batch.attention_mask[row]].tolist()
                    try:
                        self.tokens.check_context(ids, r.context_images)
                    except ValueError as exc:
                        raise ValueError(
                            f"rollout prompt_id={r.prompt_id} sample_index={r.sample_index}: {exc}") from None
        except ValueError as exc:
            error = exc
        all_ok = self.all_reduce([0.0 if error else 1.0], "min")[0] > 0
        if error is not None:
            raise error
        if not all_ok:
            raise RuntimeError("train_step: another learner rank rejected its shard (its error says why)")

    # ------------------------------------------------------------------ training
    def train_chains(self, advantages: Sequence[ChainAdvantage], padding: bool, *rollouts: Rollout,
                     version: Optional[int] = None, max_staleness: Optional[int] = None) -> dict[str, float]:
        """The GRPO update on this rank's own chains: the batch is built here from the rollouts (varargs, so Ray
        resolves the refs passed for them), so the driver only ever holds refs. ``padding``: this rank got no
        chain and trains a masked copy (zero loss) to stay in step with the others' collectives."""
        pad_id = self.tokens.tokenizer.pad_token_id if self.tokens is not None else 0
        batch = build_train_batch(list(rollouts), list(advantages), pad_token_id=pad_id or 0,
                                  credit=self.credit, tags=self.tags,
                                  train_steps_fraction=self.diffusion_cfg.train_steps_fraction,
                                  train_steps_start=self.diffusion_cfg.train_steps_start)
        if padding:
            batch = masked_copy(batch)
        return self.train_step(batch, *rollouts, version=version, max_staleness=max_staleness)

    def train_step(self, batch: TrainBatch, *rollouts: Rollout, version: Optional[int] = None,
                   max_staleness: Optional[int] = None) -> dict[str, float]:
        """The GRPO update on a built batch (``learner.grpo_step.train_step``); ``version``: the learner's
        policy version before it (stale chains are corrected, those more than ``max_staleness`` versions old
        dropped; None: all on-policy)."""
        return grpo_step.train_step(self, batch, rollouts, version, max_staleness)

    def sft_step(self, *records: Any) -> dict[str, float]:
        """One supervised step on this rank's ``SFTRecord``s (varargs, so Ray resolves refs)."""
        return sft_step.sft_step(self, records)

    # ------------------------------------------------------------------ weights and checkpoints
    def serialized_state(self, model: str) -> tuple[list[bytes], dict[str, float]]:
        return persistence.serialized_state(self, model)

    def gather_full_state(self, model: str) -> dict[str, torch.Tensor]:
        return persistence.gather_full_state(self, model)

    def sync_state(self, model: str) -> dict[str, torch.Tensor]:
        """What a weight sync ships of ``model`` (rank 0): the adapters alone or the merged weights."""
        return persistence.sync_state(self, model)[0]

    def join_weight_group(self, host: str, port: int, world_size: int, timeout_s: float) -> int:
        """Rank 0 opens the rollout actors' collective weight-sync group as its root (``core.weight_broadcast``);
        other ranks take no part in it. Returns this rank."""
        if self.rank == 0:
            self.sync_group = weight_broadcast.open_group(host, port, 0, world_size, self.cfg.backend, timeout_s)
        return self.rank

    def open_transfer(self, backend: str, init: dict[str, Any]) -> int:
        """Rank 0 opens vLLM's weight-transfer group as its rank 0 (``learner.transfer``), while every vLLM worker
        joins it; other ranks take no part."""
        if self.rank == 0:
            if self.transfer is not None:
                self.transfer.close()
            self.transfer = transfer.open_sender(backend, init)
        return self.rank

    def sync_metadata(self, model: str) -> dict[str, list]:
        """Names, dtypes and shapes of what a sync ships of ``model``, in order (no gather, no collective)."""
        return persistence.sync_metadata(self, model)

    def broadcast_weights(self, models: Sequence[str], transfer_models: Sequence[str] = (),
                          announced: Optional[dict[str, dict]] = None) -> dict[str, float]:
        """All ranks gather each of ``models`` (a collective under ZeRO-3); rank 0 sends it: the ``transfer_models``
        through vLLM's weight transfer, checked against what the workers were ``announced``
        (``sync_metadata``), the others over the actors' weight-sync group. Returns what rank 0 sent ({} on the
        others)."""
        out: dict[str, float] = {}
        for model in models:
            state, adapter_bytes = persistence.sync_state(self, model)
            if self.rank != 0:
                continue
            if adapter_bytes is not None:  # what shipping the LoRA adapters alone would move
                out[f"weight_sync/{model}_adapter_mb"] = adapter_bytes / 2**20
            if model in transfer_models:
                stats = self.transfer.send(state.items(), (announced or {})[model])
            else:
                stats = weight_broadcast.broadcast_weights(self.sync_group, state.items(),
                                                           self.cfg.sync_bucket_mb << 20, device=self.device)
            out[f"weight_sync/{model}_mb"] = stats.num_bytes / 2**20
            out[f"weight_sync/{model}_buckets"] = float(stats.num_buckets)
            out[f"weight_sync/{model}_broadcast_s"] = stats.seconds
        return out

    def parameter_digest(self, model: str) -> dict[str, float]:
        return persistence.parameter_digest(self, model)

    def export_hf(self, directory: str) -> dict[str, str]:
        return persistence.export_hf(self, directory)

    def save_checkpoint(self, directory: str) -> None:
        persistence.save_checkpoint(self, directory)

    def load_checkpoint(self, directory: str) -> None:
        persistence.load_checkpoint(self, directory)
