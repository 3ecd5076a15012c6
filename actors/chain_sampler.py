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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from actors.text_engine import TextEngine, TextRequest, TextSample
from core.chain import STAGES, TURNS, image_section, parse_chain, stage_sizes
from core.config import ChainConfig, DiffusionConfig, SamplingConfig
from core.records import DiffusionTrace, Rollout, Sample


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
    last_image: Optional[np.ndarray] = None
    stage_images: dict[str, np.ndarray] | None = None
    traces: list[DiffusionTrace] | None = None
    finish: list[str] | None = None
    turn_text: str = ""  # the text of the latest turn


def stage_understanding(turn_text: str, stage: str) -> str:
    """The understanding text the diffusion model is conditioned on for ``stage``.

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
                 sampling: Optional[SamplingConfig] = None):
        self.engine = engine
        self.pipeline = pipeline
        self.chain = chain
        self.diffusion = diffusion
        self.sampling = sampling  # None: the engine's own
        self.tokens = engine.tokens
        self.scales = {"rough": chain.rough_scale, "middle": chain.middle_scale, "final": chain.final_scale}

    def sample(self, samples: Sequence[Sample], group_size: int, seed: int,
               policy_version: int = 0, diffusion_version: int = 0) -> list[Rollout]:
        """B prompts -> B*G rollouts ordered [p0s0, p0s1, ..., p1s0, ...]."""
        timings = {"text_s": 0.0, "diffusion_s": 0.0}
        start = time.perf_counter()
        chains: list[_Chain] = []
        for s in samples:
            prompt = self.tokens.prompt_ids(s.lr, self.chain.prompt)
            for g in range(group_size):
                chains.append(_Chain(s.prompt_id, g, list(prompt), [s.lr], len(prompt), [], [],
                                     last_image=s.lr, stage_images={}, traces=[], finish=[]))
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
            # 2. image
            t0 = time.perf_counter()
            size = stage_sizes(lr_hw, self.scales)[turn.stage]
            prompts = [stage_understanding(c.turn_text, turn.stage) for c in chains]
            generators = [torch.Generator().manual_seed(_seed(seed, c.prompt_id, k, c.sample_index, 7))
                          for c in chains]
            images, traces = self.pipeline.sample(
                [c.last_image for c in chains], size, prompts, num_steps=self.diffusion.num_steps,
                eta=self.diffusion.eta, noise_level=self.diffusion.noise_level, generator=generators,
                guidance_scale=self.diffusion.guidance_scale, stage=turn.stage,
            )
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
            traces=tuple(c.traces),
            timings=dict(timings),
            finish_reasons=tuple(c.finish),
        )


def _seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (the run seed, prompt id, turn, sample index)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h % (2**31 - 1)
