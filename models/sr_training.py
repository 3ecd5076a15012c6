"""The learner's side of ``models.sr_pipeline.SRPipeline`` (a mixin of it): re-scoring recorded trajectories, the
forward-process predictions of DiffusionNFT, and the cold start's denoising loss. Kept apart from the sampling
side so that each module reads in one sitting; every method uses the pipeline's components (``self.unet``,
``self.pipe.scheduler``, ...) and its ``predict`` / ``encode_text`` / ``prepare_condition``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from core.images import to_tensor
from core.records import DiffusionTrace
from models.sde import SDEStepOutput, Generator, ddim_step_with_logprob, gaussian_mean_kl


class SRTraining:
    """Re-scoring (GRPO's trajectory objective), forward-process predictions (NFT) and the denoising loss (SFT) of
    ``pipeline``'s current weights."""

    def __init__(self, pipeline: Any):
        self.pipe = pipeline

    def trace_log_probs(
        self, traces: Sequence[DiffusionTrace], step_indices: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Re-score recorded transitions under the current weights: (N, K) log-probs, K = len(step_indices).

        step_indices: which denoising steps (0..S-1) to score, the same for every trace (default: all S);
        every trace must have the same S.
        Differentiable through the UNet and the text encoder. All chosen steps of a group of same-shaped
        traces go through the UNet as one batch; to bound memory, call once per step (``[k]``) and backward
        each (Flow-GRPO's loop).
        """
        return self.trace_log_probs_and_kl(traces, step_indices)[0]

    def trace_log_probs_and_kl(
        self, traces: Sequence[DiffusionTrace], step_indices: Sequence[int] | None = None,
        reference: "SRTraining | None" = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``trace_log_probs``, and with a ``reference`` pipeline (the base SR model, frozen) the exact KL of each
        re-scored transition to the reference's: both are Gaussians with the same sigma_t, so
        KL = |mean - mean_ref|^2 / (2 sigma_t^2), averaged over pixels like the log-prob (``gaussian_mean_kl``).
        Returns ((N, K) log-probs, (N, K) KL or None)."""
        if not traces:
            raise ValueError("trace_log_probs: no traces")
        S = len(traces[0].timesteps)
        if any(len(tr.timesteps) != S for tr in traces):
            raise ValueError(
                f"traces have {sorted({len(tr.timesteps) for tr in traces})} steps: one count per call"
            )
        steps = list(range(S)) if step_indices is None else [int(k) for k in step_indices]
        rows: list[torch.Tensor | None] = [None] * len(traces)
        kls: list[torch.Tensor | None] = [None] * len(traces)
        for idx in _group_traces(traces):
            group = [traces[i] for i in idx]
            step = self._group_step(group, steps)
            kl = None
            if reference is not None:
                with torch.no_grad():
                    ref = reference._group_step(group, steps)
                kl = gaussian_mean_kl(step.mean, ref.mean, step.std).view(len(group), len(steps))
            for j, i in enumerate(idx):
                rows[i] = step.log_prob.view(len(group), len(steps))[j]
                kls[i] = None if kl is None else kl[j]
        return torch.stack(rows), (None if reference is None else torch.stack(kls))  # (N, K)

    def _group_step(self, traces: list[DiffusionTrace], steps: list[int]) -> SDEStepOutput:
        """Same-shaped traces (B of them) -> their B*K transitions (sample-major); one UNet call."""
        first = traces[0]
        B, K, S = len(traces), len(steps), len(first.timesteps)
        if any(not 0 <= k < S for k in steps):
            raise ValueError(f"step_indices {steps}: must be in [0, {S})")
        self.pipe.scheduler.set_timesteps(S, device=self.pipe.device)
        if not torch.equal(self.pipe.scheduler.timesteps.cpu(), first.timesteps.cpu().long()):
            raise ValueError(
                f"trace timesteps {first.timesteps.tolist()} differ from the scheduler's "
                f"{self.pipe.scheduler.timesteps.tolist()} for {S} steps: was the scheduler config changed?"
            )
        dev = self.pipe.device
        lat = torch.stack([tr.latents for tr in traces]).to(dev)  # (B, S+1, C, h, w)
        k = torch.tensor(steps, device=dev)
        x_t = lat[:, k].flatten(0, 1)  # (B*K, C, h, w), sample-major
        x_prev = lat[:, k + 1].flatten(0, 1)
        t = first.timesteps.to(dev).long()[k].repeat(B)  # (B*K,)
        cond = torch.stack([tr.condition for tr in traces]).to(dev).repeat_interleave(K, dim=0)
        levels = self._labels(traces).repeat_interleave(K)
        text = self.pipe.encode_text(torch.stack([tr.text_ids for tr in traces])).repeat_interleave(K, dim=0)
        uncond = None
        if first.guidance_scale != 1.0:
            uncond = self.pipe.encode_text(self.pipe.tokenize([""])).expand(B * K, -1, -1)
        out = self.pipe.predict(x_t, t, cond, text, levels, first.guidance_scale, uncond)
        return ddim_step_with_logprob(self.pipe.scheduler, out, t, x_t, first.eta, prev_sample=x_prev)

    # ------------------------------------------------------------------------------------------ forward process
    def _labels(self, traces: Sequence[DiffusionTrace]) -> torch.Tensor:
        """The class labels the traces were sampled with: their noise levels, and stages for a stage-aware model."""
        levels = torch.tensor([tr.noise_level for tr in traces], device=self.pipe.device)
        return self.pipe.class_labels(levels, [tr.stage for tr in traces])

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, text_ids: torch.Tensor,
                   class_labels: torch.Tensor) -> torch.Tensor:
        """The model's x_0 for x_t (B, C, h, w) at timesteps t (B,), whatever its prediction type; differentiable.
        condition (B, 3, h, w), text_ids (B, L), class_labels (B,) (``SRPipeline.class_labels``)."""
        out = self.pipe.predict(x_t, t, condition, self.pipe.encode_text(text_ids.to(self.pipe.device)), class_labels)
        kind = self.pipe.scheduler.config.prediction_type
        if kind == "sample":
            return out
        a = self.pipe.scheduler.alphas_cumprod.to(self.pipe.device)[t].float().view(-1, 1, 1, 1)
        if kind == "epsilon":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * out  # v_prediction

    def forward_process(
        self, traces: Sequence[DiffusionTrace], step_index: int, generator: Generator = None,
        reference: "SRTraining | None" = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """DiffusionNFT's view of sampled images: each trace's x_0 (its last latent) noised by the forward process
        to the timestep of its denoising step ``step_index``, and the model's x_0 prediction there.

        Same-shaped traces of one schedule (one stage). Returns (prediction (N, C, h, w) with grad, the traces'
        x_0, the ``reference``'s prediction at the same noised images (no grad) or None)."""
        first = traces[0]
        if any(tr.latents.shape != first.latents.shape or not torch.equal(tr.timesteps, first.timesteps)
               for tr in traces):
            raise ValueError("forward_process: traces of one shape and schedule per call (one stage)")
        dev = self.pipe.device
        x0 = torch.stack([tr.latents[-1] for tr in traces]).to(dev).float()  # (N, C, h, w)
        t = first.timesteps.to(dev).long()[step_index].expand(len(traces))
        x_t = self.pipe.scheduler.add_noise(x0, randn_tensor(tuple(x0.shape), generator, dev, torch.float32), t)
        cond = torch.stack([tr.condition for tr in traces]).to(dev)
        ids = torch.stack([tr.text_ids for tr in traces])
        levels = self._labels(traces)
        prediction = self.predict_x0(x_t, t, cond, ids, levels)
        ref = None
        if reference is not None:
            with torch.no_grad():
                ref = reference.predict_x0(x_t, t, cond, ids, levels)
        return prediction, x0, ref

    # ------------------------------------------------------------------------------------------ SFT
    def denoising_loss(
        self,
        targets: Sequence[np.ndarray],
        conditions: Sequence[np.ndarray],
        prompts: Sequence[str],
        generator: torch.Generator | None = None,
        noise_level: int = 20,
        prompt_dropout: float = 0.0,
        stage: str = "",
    ) -> torch.Tensor:
        """Scalar MSE of the UNet's prediction (epsilon, v or x_0 per the scheduler) at random timesteps.

        targets: same-sized uint8 (H, W, 3) HR images of one ``stage``; conditions: what ``sample`` would be given
        for them.
        prompt_dropout: share of prompts replaced by "" so that classifier-free guidance has an
        unconditional model to contrast with.
        """
        B = len(targets)
        if not (len(conditions) == len(prompts) == B) or B == 0:
            raise ValueError(
                f"{B} targets, {len(conditions)} conditions, {len(prompts)} prompts: need equal, > 0"
            )
        sizes = {t.shape for t in targets}
        if len(sizes) != 1:
            raise ValueError(f"targets must share one size, got {sorted(sizes)}")
        size = targets[0].shape[:2]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        x0 = torch.stack([to_tensor(t, low=-1.0) for t in targets]).to(self.pipe.device)  # (B, 3, H, W)
        base = self.pipe.residual_base(conditions, size)
        if base is not None:
            x0 = x0 - base
        if self.pipe.vae is not None:
            posterior = self.pipe.vae.encode(x0.to(self.pipe.vae.dtype)).latent_dist
            x0 = (posterior.sample(generator) * self.pipe.vae.config.scaling_factor).float()
        keep = torch.rand(B, generator=generator, device=gen_device) >= prompt_dropout
        prompts = [p if keep[i] else "" for i, p in enumerate(prompts)]
        cond = self.pipe.prepare_condition(conditions, size, noise_level, generator)
        T = self.pipe.scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (B,), generator=generator, device=gen_device).to(self.pipe.device)
        noise = randn_tensor(tuple(x0.shape), generator, self.pipe.device, torch.float32)
        x_t = self.pipe.scheduler.add_noise(x0, noise, t)
        kind = self.pipe.scheduler.config.prediction_type
        target = {"epsilon": noise, "sample": x0}.get(kind)
        if target is None:
            target = self.pipe.scheduler.get_velocity(x0, noise, t)
        levels = self.pipe.class_labels(torch.full((B,), noise_level, dtype=torch.long, device=self.pipe.device),
                                        [stage] * B)
        pred = self.pipe.predict(x_t, t, cond, self.pipe.encode_text(self.pipe.tokenize(prompts)), levels)
        return F.mse_loss(pred, target.float())


def _group_traces(traces: Sequence[DiffusionTrace]) -> list[list[int]]:
    """Indices of traces that can share a UNet batch: same shapes, schedule, eta and guidance."""
    groups: dict[tuple, list[int]] = {}
    for i, tr in enumerate(traces):
        key = (
            tuple(tr.latents.shape),
            tuple(tr.text_ids.shape),
            tuple(tr.timesteps.tolist()),
            tr.eta,
            tr.guidance_scale,
        )
        groups.setdefault(key, []).append(i)
    return list(groups.values())
