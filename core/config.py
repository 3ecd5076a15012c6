"""Typed experiment configuration.

One frozen tree of dataclasses, filled from a YAML file plus ``key=value`` overrides through OmegaConf
(so ``${...}`` interpolation works). Three kinds of mistakes are errors that name the key and the value:
an unknown key, a value of the wrong type, and a value that is impossible for the system (``validate``).
Each actor receives only its own sub-config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.data_config import DataConfig, DegradationConfig  # noqa: F401 (DegradationConfig: re-exported)
from core.model_config import (  # noqa: F401 (re-exported: the models' sections of the config)
    DiffusionConfig, LoraConfig, PolicyConfig, TinyDiffusionConfig, TinyPolicyConfig)
from core.validation import ConfigError, describe_omegaconf_error, validate


# --------------------------------------------------------------------------------------------- cluster
@dataclass
class RayConfig:
    address: Optional[str] = None  # None: $RAY_ADDRESS if set, else a new local cluster
    num_cpus: Optional[int] = None  # local cluster only; None lets Ray count the cores
    host: str = "127.0.0.1"  # the local head and dashboard bind here, never 0.0.0.0
    include_dashboard: bool = False
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD


# --------------------------------------------------------------------------------------------- chain + data
@dataclass
class ChainConfig:
    rough_scale: int = 1  # stage image size as a multiple of the LR size
    middle_scale: int = 2
    final_scale: int = 4
    max_stage_tokens: int = 48  # per text turn; a turn stops earlier at its closing tag
    prompt: Optional[str] = None  # None: the paper's RL prompt (core.chain.DEFAULT_PROMPT)


# --------------------------------------------------------------------------------------------- rollout
@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    seed: Optional[int] = None


@dataclass
class VLLMConfig:
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    max_model_len: int = 2048
    enforce_eager: bool = True
    in_process: bool = True  # in-process engine: ~4 s start on CPU instead of ~20 s


@dataclass
class RolloutConfig:
    num_actors: int = 1
    engine: str = "vllm"  # vllm | hf
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 3  # Ray restarts a dead actor; its in-flight work is re-issued by the driver
    call_timeout_s: float = 0.0  # a rollout call not back in this time (from its start or the actor's kill) is
    # treated as a dead actor: killed, restarted by Ray, re-run; it must cover an actor restart. 0: no deadline


# --------------------------------------------------------------------------------------------- rewards
@dataclass
class QualityMetricConfig:
    name: str = MISSING  # a pyiqa metric name, e.g. topiq_nr, musiq, maniqa-pipal, clipiqa
    weight: float = 1.0
    scale: float = 1.0  # the raw score is divided by this (MUSIQ: 100) before clamping to [0, 1]
    lower_better: bool = False  # when true the normalised score is 1 - score/scale
    options: dict[str, Any] = field(default_factory=dict)  # passed to pyiqa.create_metric (e.g. pretrained_model_path)


@dataclass
class PanelMetricConfig:
    name: str = MISSING  # a pyiqa metric, reported on held-out images and never a reward (e.g. gmsd, fsim, nlpd)
    lower_better: bool = False  # must agree with pyiqa's (checked when the panel is built)
    options: dict[str, Any] = field(default_factory=dict)  # passed to pyiqa.create_metric


@dataclass
class EvalPanelConfig:  # metrics for evaluation only: a gamed reward (one metric up, the others down) shows
    metrics: list[PanelMetricConfig] = field(default_factory=list)  # no-reference, on the final image
    full_reference: list[PanelMetricConfig] = field(default_factory=list)  # against HR


@dataclass
class RewardWeights:
    format: float = 1.0
    degradation: float = 1.0
    understanding: float = 1.0
    generation: float = 1.0


@dataclass
class RewardConfig:
    num_actors: int = 2
    weights: RewardWeights = field(default_factory=RewardWeights)
    understanding_stages: list[str] = field(default_factory=lambda: ["rough"])
    metrics: list[QualityMetricConfig] = field(default_factory=list)
    full_reference: list[QualityMetricConfig] = field(default_factory=list)  # optional terms against HR
    # full-reference metrics for the rough and middle images against the HR at their size (the cold start's
    # targets): the process rewards generation/<stage> that grpo.image_credit {name: stage} reads. []: none.
    stage_metrics: list[QualityMetricConfig] = field(default_factory=list)
    failed_metric: str = "renormalize"  # renormalize: weights of the metrics that worked | zero: count as 0
    metric_timeout_s: float = 120.0
    call_timeout_s: float = 0.0  # a scoring call not back in this time: its actor is killed, its chains re-issued
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    max_restarts: int = 3


# --------------------------------------------------------------------------------------------- learning
@dataclass
class GRPOConfig:
    group_size: int = 4  # G chains per prompt
    prompts_per_step: int = 2  # B
    scale_by_std: bool = True
    eps: float = 1e-6
    filter_zero_variance: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.28
    # The denoising steps' own clip range [1 - r, 1 + r]: a step's ratio moves far faster than a token's
    # (Flow-GRPO clips at 1e-4 to 1e-5). null: the text's clip_low / clip_high. The trajectory objective's only.
    image_clip_range: Optional[float] = None
    # How the SR model learns from its images' advantages, a rule of core.grpo.IMAGE_OBJECTIVES with its options:
    # {name: trajectory} the clipped surrogate on the recorded denoising steps' log-probs (Flow-GRPO, the default);
    # {name: nft, beta: 1.0, adv_clip: 5.0} DiffusionNFT's forward-process loss on the sampled images (no
    # likelihoods). Both train the steps of diffusion.train_steps_fraction / _start; image_kl_beta applies to both.
    # The learner runs each through its own micro-step (learner.image_objectives).
    image_objective: dict[str, Any] = field(default_factory=lambda: {"name": "trajectory"})
    kl_beta: float = 0.0  # 0 disables the reference model entirely
    # + image_kl_beta x the exact KL of each trained denoising step to the base SR model's (the run's starting
    # weights, a frozen copy per learner rank; Flow-GRPO's KL term). 0: off, no copy held.
    image_kl_beta: float = 0.0
    update_epochs: int = 1  # passes over the step's batch, one optimizer step each (text + image loss, weight 1)
    # Which reward components (weighted by reward.weights) the advantage of the text tokens / of the diffusion
    # steps is normalised from. null: the chain's total, shared by both (the paper); []: none (advantage 0).
    # E.g. image_rewards: [generation] judges the images only by the reward they can change.
    text_rewards: Optional[list[str]] = None
    image_rewards: Optional[list[str]] = None
    # How a chain's advantages reach its text tokens: a rule of core.grpo.TOKEN_CREDIT with its options.
    # {name: chain}: every sampled token gets the chain's text advantage (the paper). {name: section}: each token
    # gets the advantage of its section, from section_rewards; its option degradation_items: true gives the tokens
    # stating a degradation item that item's own advantage (research: docs/journal/2026-12-04-degradation-adapters.md).
    token_credit: dict[str, Any] = field(default_factory=lambda: {"name": "chain"})
    # token_credit section only: the components each text section (degradation, rough/middle/final_understand)
    # learns from, e.g. {degradation: [format, degradation]} or {final_understand: [format/final_understand]}
    # (that section's own format, rewards.format); a section not named takes text_rewards'; an empty list: its
    # tokens get advantage 0 (only the KL term reaches them).
    section_rewards: Optional[dict[str, list[str]]] = None
    # Applied in order to the normalised advantages, each a rule of core.grpo.ADVANTAGE_TRANSFORMS with its
    # options: [{name: placebo_shuffle}] (the placebo control: advantages permuted within each group, to measure
    # what the reward adds). []: none (the paper).
    advantage_transforms: list[dict[str, Any]] = field(default_factory=list)
    # Stale chains (trainer.max_staleness > 0): weight of a token / step, min(pi_prox / pi_sampling, tis_cap) (TIS)
    tis_cap: float = 2.0
    # How the text ratio treats the rollout engine's own numerics (learner.off_policy): tis, every chain's text is
    # clipped against the learner's first-epoch log-probs and weighted by min(learner / engine, tis_cap) (decoupled
    # PPO); none, the engine's log-probs are the old policy (the paper's). Both log learner/engine_logp_gap.
    engine_correction: str = "tis"
    # M image samples per chain for the image loss, for the cost of diffusion only (Flow-GRPO trains on many images
    # per prompt): each chain's three stages are sampled M times from its own texts with other noise, each branch
    # conditioned on its own previous image; branch 0 is the one the policy reads and writes after. Every branch's
    # final image is scored (the chain's generation reward is their mean) and each branch's denoising steps get
    # its own image advantage: centred on its chain's M branches (the text is shared, so what is left is the SR
    # model's own doing) and scaled by the spread of those residuals over the group. 1: one image per chain.
    image_group_size: int = 1
    # Which advantage each stage's denoising steps learn from, a rule of core.grpo.IMAGE_CREDIT: {name: final},
    # every stage the final image's (an outcome reward: each stage conditions the next); {name: stage}, the rough
    # and middle steps their own image's (reward.stage_metrics' generation/<stage>, normalised like the final's).
    image_credit: dict[str, Any] = field(default_factory=lambda: {"name": "final"})
    # Each reward component of an advantage column is normalised within its group on its own before the column's
    # weighted sum, and the generation reward counts as its metrics (quality/<metric>, weighted as in its average):
    # decoupled normalisation (LucidNFT, GDPO). A metric whose spread within a group is small (PSNR between
    # near-identical SR outputs) then weighs as much as one whose spread is large (PIQE), so no single metric
    # carries the advantage. false: the weighted sum is normalised as one reward (the paper).
    decoupled_normalization: bool = False


@dataclass
class ExperimentalConfig:
    """Research controls with no settled verdict (docs/journal/variants.md): each key is off by default, no product
    config sets one, and each links the journal entry that used it. A key leaves this section for its own once a
    pre-registered test settles it, or is removed when one finds no held-out gain."""

    # > 0: in training rollouts every sampled image of a residual SR model keeps exp(std * z) x its detail (z ~ N(0,1)
    # per image): sharper and smoother versions of one input for the image loss to compare, which the sampler's
    # noise alone never makes. DiffusionNFT only (it learns from the images, not the steps); the held-out evaluation
    # never explores. configs/experiments/image_kl2.yaml (0.3) needs it. Journal:
    # docs/journal/2026-12-05-detail-gains.md (no held-out gain alone), docs/journal/2026-12-07-image-kl2-seed3.md
    # (the image_kl2 candidate: above its placebo, not a settled result).
    detail_gain_std: float = 0.0


@dataclass
class OptimConfig:
    # adamw, or sgd: an update proportional to the gradient, so parameters whose gradient is only noise barely
    # move (Adam moves every parameter ~lr a step whatever its gradient's size)
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    momentum: float = 0.0  # sgd
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.1
    # {pattern: factor}: a trained parameter whose full name a pattern matches (re.search, the first in order)
    # learns at factor x lr, e.g. {'norm': 20} for a norm trained in full beside LoRA adapters
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class LearnerConfig:
    num_ranks: int = 2
    zero_stage: int = 2
    backend: str = "gloo"  # gloo on CPU, nccl on GPU
    dtype: str = "float32"  # float32 on CPU, bfloat16 on GPU
    micro_batch_size: int = 2  # chains per rank per forward/backward
    grad_clip: float = 1.0
    policy_optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion_optim: OptimConfig = field(default_factory=OptimConfig)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    sync_bucket_mb: int = 64
    # How new weights reach the rollout actors (rl.weight_sync): object_store (safetensors buckets through Ray's
    # object store) | collective (a broadcast from rank 0 over a gloo / NCCL group of its own, learner.backend)
    sync_backend: str = "object_store"
    sync_timeout_s: float = 120.0  # a collective sync member that does not answer in this time fails the sync
    # a learner call (step, weight gather, checkpoint, export) not back on every rank in this time: the late ranks are
    # killed as hung and the run heals like after a dead rank (trainer.max_failures); 0: no deadline
    call_timeout_s: float = 1800.0
    master_port: Optional[int] = None  # None: a free port on rank 0's node


@dataclass
class SFTConfig:
    batch_size: int = 4  # samples per step; trainer.total_steps counts the steps
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0


@dataclass
class TrainerConfig:
    total_steps: int = 20
    log_dir: str = "${output_dir}/tensorboard"
    checkpoint_dir: str = "${output_dir}/checkpoints"
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    image_every: int = 5
    # every eval_every steps (0: never; grpo mode) the current policy samples grpo.group_size chains for each of
    # the first eval_images held-out prompts through the run's own actors; rewards logged under eval/
    eval_every: int = 0
    eval_images: int = 4
    # held-out-only image metrics, logged raw (the metric's own units) as eval/panel/<metric> beside eval/reward/*
    eval_panel: EvalPanelConfig = field(default_factory=EvalPanelConfig)
    # 0: synchronous. k >= 1: the rollout and rewards of the next k steps run while the learner trains, so a chain
    # is at most k policy versions old when trained on (corrected by grpo.tis_cap); older ones (from a rollout actor
    # restarted and not yet back in the collective sync) are dropped by the learner.
    max_staleness: int = 0
    resume: Any = False  # false: fresh | true: from the latest complete checkpoint (one must exist) | auto: if any
    max_failures: int = 0  # a dead learner rank: rebuild learner + rollouts, resume the latest checkpoint, N times
    # consecutive steps whose learner update was skipped (a non-finite gradient norm: weights unchanged) that end the
    # run, naming the step; 0: never
    max_skipped_steps: int = 3
    overwrite: bool = False  # a fresh run into a used folder moves its outputs aside (core.run_folder)
    accept_changes: bool = False  # a resume may change trajectory keys (else it stops, listing them)
    seed: int = 0
    progress_bar: bool = True


@dataclass
class ExperimentConfig:
    name: str = "realsr-r1"
    mode: str = "grpo"  # grpo | sft
    output_dir: str = "runs/${name}"
    # an SFT config the launcher runs first when <model>.init_from does not exist yet; init_from must name its
    # final export (<its output_dir>/checkpoints/step_<its total_steps>/export/<model>). null: none
    cold_start: Optional[str] = None
    ray: RayConfig = field(default_factory=RayConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)  # research controls, off


# --------------------------------------------------------------------------------------------- loading
def _is_plain_mapping(node: Any) -> bool:
    """A dict-typed value (``lr_scale``, ``section_rewards``, a registry rule like ``grpo.image_objective``), not a
    section of dataclass fields: ``key={...}`` replaces it whole. Merging would make ``lr_scale={}`` a silent no-op
    and keep nft's options when switching ``grpo.image_objective`` to trajectory."""
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read ``path``, apply ``key=value`` overrides, resolve interpolations, validate.

    Raises ConfigError naming the file, the key and the value of the first problem found.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(path))
        for item in overrides:
            key, dot = item.split("=", 1)[0].strip(), OmegaConf.from_dotlist([item])
            if _is_plain_mapping(OmegaConf.select(merged, key, default=None)):
                OmegaConf.update(merged, key, OmegaConf.select(dot, key), merge=False)
            else:
                merged = OmegaConf.merge(merged, dot)
        cfg: ExperimentConfig = OmegaConf.to_object(merged)  # resolves ${...}, checks MISSING
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {describe_omegaconf_error(exc)}") from None
    validate(cfg, source=str(path))
    if cfg.cold_start is not None:
        cold_start_config(cfg, source=str(path))  # checked now, run later (rl.launch)
    return cfg


def cold_start_config(cfg: ExperimentConfig, source: str = "<config>") -> ExperimentConfig:
    """The SFT run ``cfg.cold_start`` names, checked to make what ``cfg`` starts from: mode sft, and every
    ``<model>.init_from`` of ``cfg`` (at least one) its final export. Raises ConfigError naming the key."""
    from core.checkpoint import step_dir_name

    key = f"{source}: key 'cold_start' = {cfg.cold_start!r}"
    if cfg.mode != "grpo":
        raise ConfigError(f"{key}: only a grpo run starts from a cold start (mode is {cfg.mode!r})")
    try:
        sft = load_config(cfg.cold_start)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if sft.mode != "sft" or sft.cold_start is not None:
        raise ConfigError(f"{key}: must be an sft config without a cold_start of its own (its mode is {sft.mode!r})")
    export = Path(sft.output_dir) / "checkpoints" / step_dir_name(sft.trainer.total_steps) / "export"
    inits = {m: getattr(cfg, m).init_from for m in ("policy", "diffusion")}
    if not any(inits.values()):
        raise ConfigError(f"{key}: set policy.init_from / diffusion.init_from to its export {export}/<model>")
    for model, init in inits.items():
        if init is not None and Path(init) != export / model:
            raise ConfigError(f"{source}: key '{model}.init_from' = {init!r}: the cold start ({cfg.cold_start}) "
                              f"exports {export / model}")
    return sft


def cold_start_pending(cfg: ExperimentConfig) -> bool:
    """True when ``cfg`` names a cold start and one of its ``init_from`` exports is not there yet."""
    return cfg.cold_start is not None and any(
        init is not None and not Path(init).exists() for init in (cfg.policy.init_from, cfg.diffusion.init_from))


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, written next to every run's outputs."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
