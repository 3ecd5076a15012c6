"""Interleaved VLCoT episodes: text turn -> SR image -> image fed back -> next text turn (no Ray here).

For a batch of B prompts x G samples, stage by stage (core.chain.TURNS):

1. the text engine continues every chain's context until the turn's closing tag
   (turn 1: ``<degradation>..</degradation><rough_understand>..</rough_understand>``);
2. the SR diffusion model makes that stage's image, conditioned on the previous image (the LR image for the rough
   stage) upsampled to the stage size and on the stage's understanding text;
3. the image section ``<rough_image>[vision tokens]</rough_image>`` is appended to the context as a real image
   input, and the next turn starts from there.

The first turn shares one context per prompt (one request with n = G); later turns diverge per chain.
The token sequence built here is exactly what the learner forwards to re-score the text (ChainTokens).

With ``image_group_size`` M > 1 every stage samples M images per chain in the same diffusion batch: branch b is
conditioned on the stage's text and on its own previous image, so each branch is a whole image trajectory given
the chain's texts. Branch 0 is fed back to the policy (the chain's ``images``); the other branches' final images
and traces ride along for the image loss (``Rollout.branch_images``). Branch 0 draws exactly the noise it draws
with M = 1, so the chains themselves do not depend on M (up to the UNet's float rounding in a larger batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from actors.text_engine import TextEngine, TextRequest, TextSample
from core.chain import STAGES, TURNS, image_section, parse_chain, stage_scales, stage_sizes
from core.config import ChainConfig, DiffusionConfig, SamplingConfig
from core.records import DiffusionTrace, Rollout, Sample
from models.sr_pipeline import StepSettings


@dataclass
class _Chain:
    """A chain under construction."""

    prompt_id: int
    sample_index: int
    context: list[int]  # canonical ids, prompt included
    images: list[np.ndarray]  # context images in token order
    prompt_len: int
    mask: list[int]
    log_probs: list[float]
    text: str = ""
    last_image: Optional[np.ndarray] = None  # branch 0's; the branches' own are in branch_images
    stage_images: dict[str, np.ndarray] | None = None
    traces: list[DiffusionTrace] | None = None  # branch 0's stages
    branch_images: list[dict[str, np.ndarray]] | None = None  # branches 1..M-1: each one's stage images so far
    branch_traces: list[list[DiffusionTrace]] | None = None  # branches 1..M-1: their stages
    finish: list[str] | None = None
    turn_text: str = ""  # the text of the latest turn


def stage_understanding(turn_text: str, stage: str) -> str:
    """The understanding text the diffusion model is conditioned on for ``stage``: its prompt, what the cold start
    trained it on (``data.sft_targets.build_record``).

    Uses the ``<{stage}_understand>`` section of the turn when the policy wrote one, else the turn's text with the
    tags stripped, so that a malformed turn still yields an image (and is punished by the format reward only).
    """
    parsed = parse_chain(turn_text)
    body = parsed.understanding(stage)
    if body:
        return body
    return " ".join(parsed.outside.split()) if parsed.outside else ""


class ChainSampler:
    """Runs the episodes for one rollout worker: a text engine plus an SR pipeline."""

    def __init__(self, engine: TextEngine, pipeline, chain: ChainConfig, diffusion: DiffusionConfig,
                 sampling: Optional[SamplingConfig] = None, image_group_size: int = 1, detail_gain_std: float = 0.0):
        if image_group_size < 1:
            raise ValueError(f"image_group_size = {image_group_size}: must be >= 1")
        if not detail_gain_std >= 0:
            raise ValueError(f"detail_gain_std = {detail_gain_std}: must be >= 0")
        self.image_group_size = image_group_size  # M image branches per chain (grpo.image_group_size)
        self.detail_gain_std = detail_gain_std  # experimental.detail_gain_std: training rollouts only (explore)
        self.engine = engine
        self.pipeline = pipeline
        self.chain = chain
        self.diffusion = diffusion
        self.sampling = sampling  # None: the engine's own
        self.tokens = engine.tokens
        self.scales = stage_scales(chain)

    def sample(self, samples: Sequence[Sample], group_size: int, seed: int,
               policy_version: int = 0, diffusion_version: int = 0, explore: bool = True) -> list[Rollout]:
        """B prompts -> B*G rollouts ordered [p0s0, p0s1, ..., p1s0, ...]. ``explore`` False: no detail gains
        (held-out evaluation samples the model as it is)."""
        timings = {"text_s": 0.0, "diffusion_s": 0.0}
        start = time.perf_counter()
        chains: list[_Chain] = []
        for s in samples:
            prompt = self.tokens.prompt_ids(s.lr, self.chain.prompt)
            for g in range(group_size):
                chains.append(_Chain(s.prompt_id, g, list(prompt), [s.lr], len(prompt), [], [],
                                     last_image=s.lr, stage_images={}, traces=[], finish=[],
                                     branch_images=[{} for _ in range(self.image_group_size - 1)],
                                     branch_traces=[[] for _ in range(self.image_group_size - 1)]))
        if not chains:
            return []
        lr_hw = samples[0].lr.shape[:2]
        for k, turn in enumerate(TURNS):
            # 1. text
            t0 = time.perf_counter()
            stop = [self.tokens.stop_ids[turn.stage]]
            if k == 0:  # one shared context per prompt: n = G
                reqs = [TextRequest(c.context, c.images, stop, n=group_size, max_tokens=self.chain.max_stage_tokens,
                                    seed=_seed(seed, c.prompt_id, k))
                        for c in chains[::group_size]]
                outs = [smp for group in self.engine.generate(reqs, self.sampling) for smp in group]
            else:
                reqs = [TextRequest(c.context, c.images, stop, n=1, max_tokens=self.chain.max_stage_tokens,
                                    seed=_seed(seed, c.prompt_id, k, c.sample_index))
                        for c in chains]
                outs = [group[0] for group in self.engine.generate(reqs, self.sampling)]
            for c, out in zip(chains, outs):
                self._append_turn(c, out)
            timings["text_s"] += time.perf_counter() - t0
            # 2. image (branch 0 of every chain, then the other branches, in one diffusion batch)
            t0 = time.perf_counter()
            size = stage_sizes(lr_hw, self.scales)[turn.stage]
            prompts = [stage_understanding(c.turn_text, turn.stage) for c in chains]
            extra = range(1, self.image_group_size)
            def image_seeds(tag: int) -> list[int]:  # one per image, in the batch's order: branch 0s, then the rest
                return ([_seed(seed, c.prompt_id, k, c.sample_index, tag) for c in chains]
                        + [_seed(seed, c.prompt_id, k, c.sample_index, tag, b) for c in chains for b in extra])

            generators = [torch.Generator().manual_seed(s) for s in image_seeds(7)]
            previous = TURNS[k - 1].stage if k else None  # a branch's condition: its own previous image, else the LR
            conditions = [c.last_image for c in chains] + [
                c.branch_images[b - 1][previous] if previous else c.images[0] for c in chains for b in extra]
            gains = None
            if explore and self.detail_gain_std > 0:
                gains = detail_gains(self.detail_gain_std, image_seeds(13))
            images, traces = self.pipeline.sample(
                conditions, size, prompts + [p for p in prompts for _ in extra],
                num_steps=self.diffusion.num_steps, generator=generators, stage=turn.stage,
                settings=StepSettings.from_config(self.diffusion), detail_gains=gains,
            )
            n, m = len(chains), self.image_group_size - 1
            for i, c in enumerate(chains):
                for b in range(m):
                    c.branch_images[b][turn.stage] = images[n + i * m + b]
                    c.branch_traces[b].append(traces[n + i * m + b])
            images, traces = images[:n], traces[:n]
            timings["diffusion_s"] += time.perf_counter() - t0
            # 3. feed the image back (the final image ends the chain: nothing is generated after it)
            for c, image, trace in zip(chains, images, traces):
                c.stage_images[turn.stage] = image
                c.traces.append(trace)
                c.last_image = image
                c.text += image_section(turn.stage)
                if turn.stage != STAGES[-1]:
                    section = self.tokens.image_section_ids(turn.stage, image)
                    c.context += section
                    c.mask += [0] * len(section)
                    c.log_probs += [0.0] * len(section)
                    c.images.append(image)
        timings["total_s"] = time.perf_counter() - start
        return [self._record(c, policy_version, diffusion_version, timings) for c in chains]

    @staticmethod
    def _append_turn(c: _Chain, out: TextSample) -> None:
        c.context += list(out.token_ids)
        c.mask += [1] * len(out.token_ids)
        c.log_probs += list(out.log_probs)
        c.text += out.text
        c.turn_text = out.text
        c.finish.append(out.finish_reason)

    @staticmethod
    def _record(c: _Chain, policy_version: int, diffusion_version: int, timings: dict) -> Rollout:
        return Rollout(
            prompt_id=c.prompt_id,
            sample_index=c.sample_index,
            policy_version=policy_version,
            diffusion_version=diffusion_version,
            prompt_ids=torch.tensor(c.context[: c.prompt_len], dtype=torch.long),
            token_ids=torch.tensor(c.context[c.prompt_len:], dtype=torch.long),
            text_mask=torch.tensor(c.mask, dtype=torch.long),
            log_probs=torch.tensor(c.log_probs, dtype=torch.float32),
            text=c.text,
            images=dict(c.stage_images),
            context_images=list(c.images),
            traces=tuple(c.traces) + tuple(t for branch in c.branch_traces for t in branch),
            timings=dict(timings),
            finish_reasons=tuple(c.finish),
            branch_images=tuple(dict(b) for b in c.branch_images),
        )


def detail_gains(std: float, seeds: Sequence[int]) -> list[float]:
    """One log-normal factor exp(std * z), z ~ N(0, 1), per image, each from its own seed (so an image's gain does
    not depend on the batch it is sampled in): how much of its sampled detail an image keeps
    (``experimental.detail_gain_std``). A sampler's images of one input differ only by their noise pattern, so GRPO
    never sees a sharper or smoother image of the same input; these gains show it one.

    >>> detail_gains(0.0, [1, 2])
    [1.0, 1.0]
    """
    return [float(np.exp(std * np.random.default_rng(s).standard_normal())) for s in seeds]


def _seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (the run seed, prompt id, turn, sample index)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h % (2**31 - 1)
