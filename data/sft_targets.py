"""Cold-start SFT targets: the chain a perfect policy would write for a synthetic LR/HR pair (no Ray here).

The paper's cold-start data is a degradation text, three captions of increasing detail and the
HR image at 1/4, 1/2 and full resolution (``gt_4``, ``gt_2``, ``gt``). Here they are synthesised from a
``Sample``:

* degradation text: ``core.chain.degradation_text`` of the degradation labels the pipeline recorded;
* understanding texts (rough < middle < final detail):
  - skimage photos: the hand-written ``PhotoInfo.captions[stage]`` of ``sample.image_id``;
  - any other source, from the image's tags (``understanding_from_tags``):
    rough  = "This image shows <all tags>."                       (every tag, so the rough text earns the full
                                                                    understanding reward)
    middle = rough + " The main subject is the <first tag>."
    final  = middle + " Its edges are sharp and its textures are fine and clear."
    with no tags, "<all tags>" reads "a scene" and the middle sentence is "The main subject is in the centre.";
* stage images: the HR image resized (area filter) to ``core.chain.stage_sizes`` of the LR size with the chain's
  scales: rough = LR size (HR/4), middle = HR/2, final = HR.

``SFTRecord`` lays the tokens out exactly as ``actors.chain_sampler.ChainSampler`` builds a rollout: turn-1 text,
the inserted ``<rough_image>`` section with gt_rough, turn-2 text, ``<middle_image>`` with gt_middle, turn-3 text
(each turn ends with its closing tag; the final image is never fed back). ``target_mask`` is 1 on the text the
policy writes, 0 on the inserted image sections; the prompt is separate (``prompt_ids``), as in ``Rollout``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

import cv2
import numpy as np
import torch

from core.chain import STAGES, TURNS, degradation_text, image_section, render_turn, stage_scales, stage_sizes
from core.records import Rollout, Sample

# Which image each stage's diffusion step is conditioned on: the LR image, then the previous stage's target.
CONDITION_OF: dict[str, str] = {"rough": "lr", "middle": "rough", "final": "middle"}


@dataclass(frozen=True)
class StageTarget:
    """One stage's denoising-loss triple (what ``SRPipeline.denoising_loss`` takes)."""

    stage: str  # rough | middle | final
    condition: np.ndarray  # (h, w, 3) uint8: LR for rough, gt_rough for middle, gt_middle for final
    target: np.ndarray  # (H, W, 3) uint8: the HR image at this stage's size
    text: str  # the diffusion prompt: the stage's understanding text


@dataclass(frozen=True)
class SFTRecord:
    """One target chain, tokenized. ``weight`` is 1.0, or 0.0 for the zero-weight copy a learner rank without
    data trains on to keep its collectives in step (it contributes no loss and no gradient)."""

    prompt_id: int
    image_id: str
    prompt_ids: torch.Tensor  # (P,) chat-templated prompt with the LR image's vision tokens
    token_ids: torch.Tensor  # (T,) turn-1 text + rough image section + turn-2 text + middle section + turn-3 text
    target_mask: torch.Tensor  # (T,) long: 1 on target text tokens (closing tags included), 0 on image sections
    context_images: list[np.ndarray]  # images in token order: [LR, gt_rough, gt_middle]
    stages: tuple[StageTarget, ...]  # rough, middle, final
    text: str  # the target chain as text, images as core.chain.IMAGE_PLACEHOLDER
    weight: float = 1.0

    def zero_weight(self) -> "SFTRecord":
        return replace(self, weight=0.0)


# ------------------------------------------------------------------------------------------ texts
def _join(words: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def understanding_from_tags(tags: Sequence[str]) -> dict[str, str]:
    """Understanding texts of increasing detail built from content tags (the rule in the module docstring).

    >>> understanding_from_tags(("lion", "rock", "sky"))["middle"]
    'This image shows lion, rock and sky. The main subject is the lion.'
    >>> understanding_from_tags(())["rough"]
    'This image shows a scene.'
    """
    rough = f"This image shows {_join(tags) if tags else 'a scene'}."
    middle = rough + (f" The main subject is the {tags[0]}." if tags else " The main subject is in the centre.")
    final = middle + " Its edges are sharp and its textures are fine and clear."
    return {"rough": rough, "middle": middle, "final": final}


def understanding_texts(image_id: str, tags: Sequence[str], photo_captions: bool = True) -> dict[str, str]:
    """Stage -> understanding text: the photo's own captions for skimage photos (``photo_captions`` and a
    known photo name), else ``understanding_from_tags``."""
    if photo_captions:
        from data.photos import PHOTOS_BY_NAME

        info = PHOTOS_BY_NAME.get(image_id)
        if info is not None:
            return {s: info.captions[s] for s in STAGES}
    return understanding_from_tags(tuple(tags))


def target_degradation(sample: Sample) -> str:
    """The degradation sentence of the sample's labels; real LR without labels cannot be a target."""
    if sample.degradation is None:
        raise ValueError(
            f"sample prompt_id={sample.prompt_id} image_id={sample.image_id!r} has no degradation labels: "
            "cold-start targets need synthetic LR (an HR image degraded by data.degradations)"
        )
    return degradation_text(sample.degradation.levels)


# ------------------------------------------------------------------------------------------ images
def stage_targets(hr: np.ndarray, lr_hw: tuple[int, int], scales: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Stage -> the HR image at that stage's size (``hr_at``)."""
    return {stage: hr_at(hr, hw, stage) for stage, hw in stage_sizes(lr_hw, dict(scales)).items()}


def hr_at(hr: np.ndarray, hw: tuple[int, int], stage: str = "final") -> np.ndarray:
    """The HR image at size ``hw`` (area filter when shrinking; the HR itself at full size): what a stage of
    that size is trained towards in the cold start and judged against by stage credit's rewards."""
    h, w = hw
    if hr.shape[:2] == (h, w):
        return hr.copy()
    if h > hr.shape[0] or w > hr.shape[1]:
        raise ValueError(
            f"stage {stage!r} needs {h}x{w} px but the HR image is only {hr.shape[0]}x{hr.shape[1]}: "
            "the final stage scale must equal data.scale"
        )
    return cv2.resize(hr, (w, h), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------------ records
def build_record(
    sample: Sample,
    tokens,
    scales: Mapping[str, int],
    prompt: Optional[str] = None,
    photo_captions: bool = True,
) -> SFTRecord:
    """The target chain of ``sample`` as an SFTRecord. ``tokens``: the policy's ``ChainTokens``; ``scales``:
    stage -> scale (``ChainConfig`` rough/middle/final_scale); ``prompt``: ``chain.prompt`` (None: the paper's)."""
    if sample.hr is None:
        raise ValueError(f"sample prompt_id={sample.prompt_id} image_id={sample.image_id!r} has no HR image")
    degradation = target_degradation(sample)
    understand = understanding_texts(sample.image_id, sample.tags, photo_captions)
    gt = stage_targets(sample.hr, sample.lr.shape[:2], scales)
    prompt_ids = tokens.prompt_ids(sample.lr, prompt)
    ids: list[int] = []
    mask: list[int] = []
    text = ""
    for turn in TURNS:
        turn_text = render_turn(turn, degradation, understand)
        turn_ids = tokens.tokenizer.encode(turn_text, add_special_tokens=False)
        if turn_ids[-1] != tokens.stop_ids[turn.stage]:  # the rollout's turn ends on this id
            raise ValueError(f"turn {turn.stage!r} target does not end with its stop tag {turn.stop!r}")
        ids += turn_ids
        mask += [1] * len(turn_ids)
        text += turn_text + image_section(turn.stage)
        if turn.stage != STAGES[-1]:  # the final image ends the chain: nothing is fed back after it
            section = tokens.image_section_ids(turn.stage, gt[turn.stage])
            ids += section
            mask += [0] * len(section)
    images = {"lr": sample.lr, **gt}
    stages = tuple(StageTarget(s, images[CONDITION_OF[s]], gt[s], understand[s]) for s in STAGES)
    return SFTRecord(
        prompt_id=int(sample.prompt_id),
        image_id=sample.image_id,
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.long),
        token_ids=torch.tensor(ids, dtype=torch.long),
        target_mask=torch.tensor(mask, dtype=torch.long),
        context_images=[sample.lr, gt["rough"], gt["middle"]],
        stages=stages,
        text=text,
    )


def target_records(samples: Sequence[Sample], tokens, cfg) -> list[SFTRecord]:
    """The target chains of ``samples`` under the experiment config ``cfg`` (its chain scales and prompt; the
    photographs' own captions for the skimage source): what the cold start trains on."""
    c = cfg.chain
    scales = stage_scales(c)
    return [build_record(s, tokens, scales, c.prompt, cfg.data.source == "skimage") for s in samples]


def to_rollout(record: SFTRecord) -> Rollout:
    """The record in the learner's rollout layout (so ``core.grpo.build_train_batch`` pads it): loss tokens =
    target tokens (none for a zero-weight record), no sampling log-probs, no traces."""
    mask = record.target_mask if record.weight > 0 else torch.zeros_like(record.target_mask)
    return Rollout(
        prompt_id=record.prompt_id,
        sample_index=0,
        policy_version=0,
        diffusion_version=0,
        prompt_ids=record.prompt_ids,
        token_ids=record.token_ids,
        text_mask=mask,
        log_probs=torch.zeros(record.token_ids.shape, dtype=torch.float32),
        text=record.text,
        images={s.stage: s.target for s in record.stages},
        context_images=list(record.context_images),
        traces=(),
    )
