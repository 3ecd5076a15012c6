"""What the learner's step and persistence functions use of their rank: the contract ``learner.worker.LearnerWorker``
fulfils. The functions take a ``Rank``, so they depend on this contract, not on the worker class."""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch

from core.config import DiffusionConfig, GRPOConfig, LearnerConfig, PolicyConfig, SFTConfig
from core.grpo import TrainBatch
from core.records import Rollout


class Rank(Protocol):
    cfg: LearnerConfig
    policy_cfg: PolicyConfig
    diffusion_cfg: DiffusionConfig
    grpo: GRPOConfig
    sft: Optional[SFTConfig]
    engines: dict[str, Any]  # "policy" / "diffusion" -> DeepSpeed engine, for the models that train
    tokens: Any  # models.chain_tokens.ChainTokens of the policy (None when it is frozen)
    reference: Any  # the frozen reference policy (grpo.kl_beta > 0): a model, or lora.BasePolicy
    diffusion_reference: Any  # the frozen base SR model's SRTraining (grpo.image_kl_beta > 0), else None
    lora: dict[str, dict[str, float]]  # model -> {adapted layer: scaling}; {} without adapters (policy.lora, diffusion.lora)
    device: torch.device
    rank: int
    world_size: int
    logprob_temperature: float
    optimizer_steps: int

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]: ...

    def validate_shard(self, batch: TrainBatch, rollouts: Sequence[Rollout]) -> None: ...

    def engine(self, model: str) -> Any: ...
