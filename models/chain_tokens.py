"""The token layout of a chain context for the Qwen2.5-VL policy (``ChainTokens``), shared by rollout and learner.

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

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from core.chain import DEFAULT_PROMPT, IMAGE_PLACEHOLDER, TURNS, image_section
from core.images import ImageLike, to_pil
from models.policy import PathLike, load_processor

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VISION_BLOCK = f"{VISION_START}{IMAGE_PAD}{VISION_END}"  # one image in compact form
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>", "<|vision_pad|>")  # never sampled


def _image_hw(image: Union[ImageLike, tuple[int, int]]) -> tuple[int, int]:
    if isinstance(image, tuple):
        return int(image[0]), int(image[1])
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


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

        ``prompt`` defaults to the paper's RL prompt; ``core.chain.IMAGE_PLACEHOLDER`` in it marks where the LR
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
