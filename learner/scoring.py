"""Re-scoring on a learner rank: the policy's log-probs of the exact rollout tokens, and the SR model's
log-probs of recorded denoising steps (``TraceScorer``, the module DeepSpeed wraps for the diffusion side).

Log-probs of the policy are taken at the rollout's sampling temperature: the engines report processed
log-probs, ``log_softmax(logits / T)`` over every id except the banned ones (``ChainTokens.banned_ids``), and
the learner re-scores the same way (see actors/text_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grpo import TrainBatch, gather_token_log_probs
from core.records import DiffusionTrace, Rollout


def policy_logits(model: nn.Module, tokens: Any, mb: TrainBatch, rollouts: Sequence[Rollout],
                  device: torch.device) -> tuple[Tensor, int]:
    """Logits (B, L - start, V) of positions start..L-1 (start = shortest prompt - 1), banned ids -inf, with
    the context images (LR, rough, middle) as pixel inputs. ``tokens``: the policy's ChainTokens."""
    images = [im for r in rollouts for im in r.context_images]
    inputs = {k: v.to(device) for k, v in tokens.image_inputs(images).items()}
    input_ids = mb.input_ids.to(device)
    length = input_ids.shape[1]
    # the logit at position P-1 predicts the first completion token: nothing before it is needed
    start = max(int(mb.prompt_lengths.min()) - 1, 0)
    attention_mask = mb.attention_mask.to(device).long()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        # transformers 5 builds Qwen2.5-VL's 3D M-RoPE positions only when told where the image pads
        # are; without it the forward silently uses 1D positions and disagrees with vLLM by nats.
        mm_token_type_ids=(input_ids == tokens.image_pad_id).int() * attention_mask,
        use_cache=False,
        logits_to_keep=length - start,
        **inputs,
    )
    logits = out.logits
    banned = tokens.banned_ids(logits.shape[-1])
    if banned:  # the engines never sample these: their log-probs are normalised over the other ids
        logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
    return logits, start


def policy_log_probs(model: nn.Module, tokens: Any, mb: TrainBatch, rollouts: Sequence[Rollout],
                     device: torch.device, temperature: float) -> Tensor:
    """Log-probs (B, L) float32 of the exact rollout tokens (prompt + completion) under ``model``; entry t is
    log p(token t | tokens < t), 0 before the first completion token. Greedy rollouts (T = 0) score at T = 1."""
    logits, start = policy_logits(model, tokens, mb, rollouts, device)
    input_ids = mb.input_ids.to(device)
    # (B, L - start): entry 0 is position `start`, a prompt token with no loss
    logp = gather_token_log_probs(logits, input_ids[:, start:], temperature if temperature > 0 else 1.0)
    logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))  # banned image pads: no loss
    return F.pad(logp, (start, 0))  # (B, L)


class TraceScorer(nn.Module):
    """The trainable parts of the SR pipeline (UNet, text encoder) as one module, so that one DeepSpeed
    engine owns them (and, under ZeRO-3, hooks them); ``forward`` runs the learner's side of the pipeline
    (``models.sr_training.SRTraining``): re-scoring recorded denoising steps, DiffusionNFT's forward-process
    predictions, or the cold start's denoising loss. State-dict names are ``unet.*`` / ``text_encoder.*``, the
    pipeline's component names, which is what the rollout side loads."""

    def __init__(self, pipeline: Any):
        from models.sr_training import SRTraining  # here: a policy-only learner needs no diffusers

        super().__init__()
        self.unet = pipeline.unet
        if getattr(pipeline, "text_encoder", None) is not None:
            self.text_encoder = pipeline.text_encoder
        self.sr = SRTraining(pipeline)  # not a module: the components it uses are registered above, once

    def forward(
        self,
        traces: Sequence[DiffusionTrace] = (),
        step_indices: Optional[Sequence[int]] = None,
        stages: Optional[Sequence[Any]] = None,
        generator: Optional[torch.Generator] = None,
        noise_level: int = 20,
        prompt_dropout: float = 0.0,
        reference: Optional[Any] = None,
        forward_step: Optional[int] = None,
    ) -> Any:
        """GRPO: (N, K) log-probs of the ``step_indices`` (None: all) of recorded ``traces``, or with
        ``forward_step`` the forward-process predictions (DiffusionNFT). SFT (``stages`` given:
        ``data.sft_targets.StageTarget``s of one size): the scalar denoising MSE. All go through this forward so
        that DeepSpeed's hooks (ZeRO-3 gathers) see every use of the weights."""
        if forward_step is not None:  # DiffusionNFT: (x_0 prediction with grad, the images' x_0, reference's or None)
            return self.sr.forward_process(traces, forward_step, generator, reference)
        if stages is not None:
            return self.sr.denoising_loss(
                [s.target for s in stages], [s.condition for s in stages], [s.text for s in stages],
                generator=generator, noise_level=noise_level, prompt_dropout=prompt_dropout, stage=stages[0].stage,
            )
        if reference is not None:  # ((N, K) log-probs with grad, (N, K) KL to the reference's transitions)
            return self.sr.trace_log_probs_and_kl(traces, step_indices, reference)
        return self.sr.trace_log_probs(traces, step_indices)  # (N, K) with grad


def load_sr_pipeline(path: str) -> Any:
    """``models.sr_pipeline.SRPipeline.from_pretrained(path)`` (imported here: the policy-only learner
    does not need diffusers)."""
    from models.sr_pipeline import SRPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"diffusion.path = {path!r}: no diffusers pipeline (model_index.json missing)")
    return SRPipeline.from_pretrained(path)


@dataclass(frozen=True)
class StageColumns:
    """The traces of one stage in a chain's ``Rollout.traces`` (one per image branch) and where their steps sit
    in the batch's step columns: the image loss re-scores a stage's step k of every branch in one UNet call."""

    stage: str
    num_steps: int
    traces: tuple[int, ...]  # indices into Rollout.traces, branch 0 first
    offsets: tuple[int, ...]  # the step column of each trace's step 0


def stage_columns(rollouts: Sequence[Rollout]) -> list[StageColumns]:
    """``trace_layout`` grouped by stage, stages in their first-trace order."""
    groups: dict[str, list[tuple[int, int, int]]] = {}
    offset = 0
    for j, (stage, steps) in enumerate(trace_layout(rollouts)):
        groups.setdefault(stage, []).append((j, offset, steps))
        offset += steps
    return [StageColumns(stage, members[0][2], tuple(j for j, _, _ in members), tuple(o for _, o, _ in members))
            for stage, members in groups.items()]


def trace_layout(rollouts: Sequence[Rollout]) -> list[tuple[str, int]]:
    """(stage, steps) of each trace, the same for every chain of a micro-batch (one config samples them all);
    the image loss walks this layout step by step."""
    layouts = {tuple((t.stage, int(t.log_probs.numel())) for t in r.traces) for r in rollouts}
    if len(layouts) != 1:
        raise ValueError(f"chains of one micro-batch have different diffusion traces: {sorted(layouts)}")
    return list(layouts.pop())
