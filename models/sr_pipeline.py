"""The text-conditioned SR diffusion model: the image half of the policy.

``SRPipeline`` is shaped like diffusers' ``StableDiffusionUpscalePipeline`` (named components, one
subfolder each, ``save_pretrained``/``from_pretrained`` as mirror images), so a real SD x4 upscaler
directory can be named in a cluster config and the tiny random model from ``build_tiny_sr_pipeline`` uses
the same layout. The UNet sees the noisy sample concatenated with the (noised) conditioning image, and the
conditioning noise level as ``class_labels``, as in the SD x4 upscaler. A stage-aware model also hears which stage it
makes: its UNet has one block of max_noise_level + 1 class embeddings per stage of ``core.chain.STAGES`` (rough,
middle, final), and its class label is ``stage index * (max_noise_level + 1) + noise level``, so one UNet can learn a
different output for each stage (the cold start, the rollout and the learner's re-scoring all pass the stage; a
``DiffusionTrace`` records it). A UNet with any other number of class embeddings (the SD x4 upscaler's 1000) is
stage-blind and hears the noise level alone.

``sample`` (the rollout: stochastic DDIM, eta > 0) returns uint8 images and one DiffusionTrace each. The learner's
side is composed around a pipeline, not part of it: ``models.sr_training.SRTraining(pipeline)`` re-scores recorded
transitions (``trace_log_probs``), predicts x_0 from forward-noised samples (``forward_process``, DiffusionNFT) and
computes the cold start's ``denoising_loss``.

Without a VAE the model works in pixel space ([-1, 1]). With one, latents are VAE latents at size / f
(f = 2^(VAE levels - 1)) and, as in the SD x4 upscaler, the conditioning image is resized to the latent size.

``residual`` (pixel space only; the tiny models set it) makes the diffusion model the residual between the
output and the clean bicubic upsampling of the conditioning image: the sampled x_0 is added to that
upsampling, and the cold start's target is the image minus it (SR3 / ResShift-style residual SR). A model that
has learned little then still returns the photograph (bicubic plus a small residual), not a texture: measured
here, 300 cold-start steps of the tiny UNet reach PSNR 21.4 dB through the three stages with a residual
x_0-predicting model, 19.5 dB with a plain x_0-predicting one and 13.1 dB with a plain epsilon-predicting one
(bicubic: 22.3 dB). Traces and log-probs are the same in both modes: the upsampling is a constant shift of x.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from core.chain import STAGES
from core.model_config import DiffusionConfig
from core.images import to_tensor
from core.records import DiffusionTrace
from models.sde import Generator, check_stochastic_schedule, ddim_step_with_logprob, logprob_scheduler

logger = logging.getLogger(__name__)

MAX_NOISE_LEVEL = 350  # the SD x4 upscaler's default: conditioning noise levels 0..350 are embedded


@dataclass(frozen=True)
class StepSettings:
    """What every denoising step of ``SRPipeline.sample`` runs with, as each ``DiffusionTrace`` records it (the
    learner re-scores a trace with the same): DDIM's eta (> 0: a stochastic step), the noise level of the
    conditioning image (0 .. ``max_noise_level``) and the classifier-free guidance scale (1: none)."""

    eta: float = 1.0
    noise_level: int = 20
    guidance_scale: float = 1.0

    @classmethod
    def from_config(cls, diffusion: DiffusionConfig) -> StepSettings:
        """The settings of ``diffusion`` (``diffusion.eta``, ``.noise_level``, ``.guidance_scale``)."""
        return cls(eta=diffusion.eta, noise_level=diffusion.noise_level, guidance_scale=diffusion.guidance_scale)


class SRPipeline(DiffusionPipeline):
    """Text encoder + UNet on [noisy sample, conditioning image] + DDIM, optional VAE (None: pixel space)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: ClassVar[list[str]] = ["vae"]

    def __init__(
        self,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        low_res_scheduler: DDPMScheduler,
        vae: AutoencoderKL | None = None,
        max_noise_level: int = MAX_NOISE_LEVEL,
        residual: bool = False,
    ):
        super().__init__()
        if residual and vae is not None:
            raise ValueError("residual = True needs a pixel-space model (vae None): a latent has no bicubic base")
        fixed = logprob_scheduler(scheduler)
        if fixed is not scheduler:
            logger.info(
                "SRPipeline: scheduler switched to trailing spacing, set_alpha_to_one=False (log-probs)"
            )
        self.register_modules(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=fixed,
            low_res_scheduler=low_res_scheduler,
            vae=vae,
        )
        self.register_to_config(max_noise_level=max_noise_level, residual=bool(residual))
        latent_channels = vae.config.latent_channels if vae is not None else 3
        if unet.config.in_channels != latent_channels + 3:
            raise ValueError(
                f"unet.config.in_channels = {unet.config.in_channels}: expected {latent_channels} sample "
                f"channels + 3 conditioning-image channels = {latent_channels + 3}"
            )

    # ------------------------------------------------------------------------------------------ shapes
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def text_max_length(self) -> int:
        return min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)

    def latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Output image (H, W) -> latent (h, w); raises when the UNet cannot take it."""
        H, W = size
        f = self.vae_scale_factor
        multiple = f * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if H % multiple or W % multiple or H <= 0 or W <= 0:
            raise ValueError(f"size = {size}: height and width must be positive multiples of {multiple}")
        return H // f, W // f

    # ------------------------------------------------------------------------------------------ inputs
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> ids (B, L), padded/truncated to the text encoder's length (SD's convention, no mask)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.text_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> hidden states (B, L, D) in the UNet's dtype; differentiable."""
        hidden = self.text_encoder(ids.to(self.device))[0]
        return hidden.to(self.unet.dtype)

    def upsample(self, images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        """uint8 HWC images -> bicubic to the latent size of ``size``, [-1, 1]: (B, 3, h, w), no noise."""
        h, w = self.latent_size(size)
        return torch.stack([_resize(to_tensor(img, low=-1.0), (h, w)) for img in images]).to(self.device)

    def residual_base(self, images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor | None:
        """What x_0 is added to (``residual``): the clean upsampled conditioning images (B, 3, H, W); else None."""
        return self.upsample(images, size) if self.config.get("residual", False) else None

    def prepare_condition(
        self, images: Sequence[np.ndarray], size: tuple[int, int], noise_level: int, generator: Generator
    ) -> torch.Tensor:
        """uint8 HWC images -> bicubic to the latent size, [-1, 1], + noise_level noise: (B, 3, h, w)."""
        if not 0 <= noise_level <= self.config.max_noise_level:
            raise ValueError(f"noise_level = {noise_level}: must be in [0, {self.config.max_noise_level}]")
        cond = self.upsample(images, size)  # (B, 3, h, w)
        noise = randn_tensor(tuple(cond.shape), generator, self.device, torch.float32)
        levels = torch.full((cond.shape[0],), noise_level, dtype=torch.long, device=self.device)
        return self.low_res_scheduler.add_noise(cond, noise, levels).float()

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages the UNet tells apart: ``STAGES`` when it has one block of class embeddings per stage, else
        none (stage-blind)."""
        stage_aware = self.unet.config.num_class_embeds == len(STAGES) * (self.config.max_noise_level + 1)
        return STAGES if stage_aware else ()

    def class_labels(self, noise_levels: torch.Tensor, stages: Sequence[str]) -> torch.Tensor:
        """The UNet's class labels for conditioning ``noise_levels`` (B,) of images of ``stages`` (B names): the
        noise level itself for a stage-blind model, its stage's block of labels for a stage-aware one."""
        known = list(self.stages)
        if not known:
            return noise_levels
        unknown = sorted({s for s in stages if s not in known})
        if unknown or len(stages) != len(noise_levels):
            raise ValueError(f"stages {list(stages)} for {len(noise_levels)} images: this SR model is stage-aware "
                             f"and knows the stages {known}, one per image")
        index = torch.tensor([known.index(s) for s in stages], dtype=torch.long, device=noise_levels.device)
        return noise_levels + index * (self.config.max_noise_level + 1)

    # ------------------------------------------------------------------------------------------ model
    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor,
        text: torch.Tensor,
        class_labels: torch.Tensor,
        guidance_scale: float = 1.0,
        uncond_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet output for x_t (B, C, h, w), t (B,), condition (B, 3, h, w), text (B, L, D), ``class_labels`` (B,).

        With guidance_scale != 1 the batch is doubled with ``uncond_text`` (B, L, D) and the outputs are
        combined as uncond + g * (cond - uncond). Returns float32 (B, C, h, w).
        """
        x_in = torch.cat([self.scheduler.scale_model_input(x_t, t), condition], dim=1)  # (B, C+3, h, w)
        x_in = x_in.to(self.unet.dtype)
        if guidance_scale == 1.0:
            return self.unet(x_in, t, encoder_hidden_states=text, class_labels=class_labels).sample.float()
        out = self.unet(
            torch.cat([x_in, x_in]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([uncond_text, text]),
            class_labels=torch.cat([class_labels, class_labels]),
        ).sample.float()
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor, base: torch.Tensor | None = None) -> list[np.ndarray]:
        """x_0 (B, C, h, w) -> uint8 (H, W, 3) images; ``base`` (``residual_base``) is added first."""
        if base is not None:
            latents = latents + base
        if self.vae is not None:
            latents = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        pixels = ((latents.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
        return list(pixels.permute(0, 2, 3, 1).cpu().numpy())

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def sample(
        self,
        conditions: Sequence[np.ndarray],
        size: tuple[int, int],
        prompts: Sequence[str],
        num_steps: int = 10,
        generator: Generator = None,
        stage: str = "",
        settings: StepSettings = StepSettings(),
        detail_gains: Sequence[float] | None = None,
    ) -> tuple[list[np.ndarray], list[DiffusionTrace]]:
        """Sample one image per (condition, prompt) at ``size`` = (H, W) in ``num_steps`` denoising steps, each run
        with ``settings`` (eta, the conditioning noise level, the guidance scale), and record each trajectory.

        conditions: uint8 (h, w, 3) images (the LR image or the previous stage's), any sizes; a list of
        generators (one per image) makes each image independent of the batch it is sampled in.
        detail_gains: one factor per image on the sampled x_0 of a residual model, its detail about the bicubic
        upsampling (``experimental.detail_gain_std``, exploration for DiffusionNFT). The trace's last latent is the
        scaled x_0; the last step's recorded log-prob stays that of the unscaled one, so a trajectory objective must not
        read traces sampled with gains other than 1.
        """
        self._check_sample_inputs(len(conditions), prompts, generator, num_steps, detail_gains)
        # text
        ids = self.tokenize(prompts)  # (B, L)
        text = self.encode_text(ids)  # (B, L, D)
        uncond = self.encode_text(self.tokenize([""] * len(ids))) if settings.guidance_scale != 1.0 else None
        # conditioning image with its noise
        cond = self.prepare_condition(conditions, size, settings.noise_level, generator)  # (B, 3, h, w)
        # schedule: every step must be a proper Gaussian
        self.scheduler.set_timesteps(num_steps, device=self.device)
        check_stochastic_schedule(self.scheduler, settings.eta)
        latents, log_probs = self._denoise(cond, text, uncond, settings, generator, stage)
        x = latents[-1]
        if detail_gains is not None:
            x = x * torch.tensor(detail_gains, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
            latents[-1] = x
        images = self.decode(x, self.residual_base(conditions, size))
        return images, self._traces(stage, latents, log_probs, cond, ids, settings)

    def _check_sample_inputs(self, batch: int, prompts: Sequence[str], generator: Generator, num_steps: int,
                             detail_gains: Sequence[float] | None) -> None:
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} conditioning images")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        if num_steps < 1:
            raise ValueError(f"num_steps = {num_steps}: must be >= 1")
        if detail_gains is not None:
            if not self.config.get("residual", False):
                raise ValueError("detail_gains scale the residual to the bicubic upsampling: this SR model is not "
                                 "residual (a plain or latent model has no detail term to scale)")
            if len(detail_gains) != batch or any(not g > 0 for g in detail_gains):
                raise ValueError(f"detail_gains {list(detail_gains)}: one positive factor per image ({batch})")

    def _denoise(self, cond: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor | None, settings: StepSettings,
                 generator: Generator, stage: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """From x_T through the scheduler's timesteps: the latents x_T .. x_0 (S + 1 of (B, C, h, w)) and each
        step's log-prob (S of (B,))."""
        B = cond.shape[0]
        levels = self.class_labels(torch.full((B,), settings.noise_level, dtype=torch.long, device=self.device),
                                   [stage] * B)
        channels = self.unet.config.out_channels
        x = randn_tensor((B, channels, *cond.shape[-2:]), generator, self.device, torch.float32)
        x = x * self.scheduler.init_noise_sigma
        latents, log_probs = [x], []
        for t in self.scheduler.timesteps:
            t_b = t.expand(B)
            out = self.predict(x, t_b, cond, text, levels, settings.guidance_scale, uncond)
            step = ddim_step_with_logprob(self.scheduler, out, t_b, x, settings.eta, generator=generator)
            x = step.prev_sample
            latents.append(x)
            log_probs.append(step.log_prob)
        return latents, log_probs

    def _traces(self, stage: str, latents: list[torch.Tensor], log_probs: list[torch.Tensor], cond: torch.Tensor,
                ids: torch.Tensor, settings: StepSettings) -> list[DiffusionTrace]:
        """One ``DiffusionTrace`` per image of the batch, on the CPU."""
        lat = torch.stack(latents, dim=1).cpu()  # (B, S+1, C, h, w)
        lp = torch.stack(log_probs, dim=1).cpu()  # (B, S)
        timesteps = self.scheduler.timesteps.cpu()  # (S,)
        return [
            DiffusionTrace(
                stage=stage,
                latents=lat[i].clone(),
                log_probs=lp[i].clone(),
                timesteps=timesteps.clone(),
                condition=cond[i].cpu().clone(),
                text_ids=ids[i].clone(),
                noise_level=int(settings.noise_level),
                eta=float(settings.eta),
                guidance_scale=float(settings.guidance_scale),
            )
            for i in range(lat.shape[0])
        ]

# ---------------------------------------------------------------------------------------------- helpers
def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased when shrinking) resize of (3, H, W) to ``size``, clamped back to [-1, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False, antialias=True)
    return out[0].clamp(-1, 1)
