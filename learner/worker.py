"""One learner rank: the policy and the SR diffusion model under DeepSpeed, trained with the GRPO losses.

``LearnerWorker`` is a plain class (no Ray). ``learner.group`` runs N of them as Ray actors forming one ZeRO
group; a test or a single-process run builds one directly (world size 1). All methods that touch model
weights are collectives: every rank must call them, in the same order.

One train step on this rank's shard (rows of a ``rl.grpo.TrainBatch`` plus the Rollouts they came from):

    for each update epoch:                                  (old log-probs stay the rollout's)
        for each micro-batch of learner.micro_batch_size chains:
            policy:    re-score prompt + completion with the context images -> clipped surrogate, text tokens
                       (+ beta * k3 KL to the frozen reference)       / global text-token count -> backward
            diffusion: re-score every denoising step of the chain's traces  -> clipped surrogate per step
                                                                       / global step count       -> backward
        step both engines (one optimizer step per epoch)

Dividing by the *global* counts (all micro-batches on all ranks) makes the accumulated gradient exactly the
token-mean of the whole batch however it is split (``rl.grpo.token_mean``). Every rank runs the same number
of micro-batches (short ranks repeat one with an all-zero mask) because ZeRO's collectives run per forward /
backward.

The supervised cold start (``sft_step``, records from ``rl.sft_data``) runs the same loop with a different loss:
text cross-entropy on the target tokens / global target-token count, plus the SR pipeline's denoising MSE
over every stage triple / global triple count; one optimizer step per call.

Log-probs of the policy are taken at temperature ``logprob_temperature``, which must be the rollout's sampling
temperature: the engines report processed log-probs, ``log_softmax(logits / T)`` over every id except the
banned ones (``ChainTokens.banned_ids``), and the learner re-scores the same way (see actors/text_engine.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learner import engine as eng
from rl.chain import TAGS, TEXT_TAGS, WRITTEN_TAGS, close_tag, open_tag
from rl.config import DiffusionConfig, ExperimentConfig, GRPOConfig, LearnerConfig, PolicyConfig, SFTConfig
from learner.weight_sync import bucket_named_tensors, serialize_bucket
from rl.grpo import (
    TrainBatch,
    build_train_batch,
    clipped_surrogate,
    gather_token_log_probs,
    image_surrogate,
    k3_kl,
    needs_reference,
    token_mean,
)
from rl.records import Rollout

MODELS = ("policy", "diffusion")
WORKER_STATE_FILE = "learner_state.json"
CHECKPOINT_TAG = "zero"  # DeepSpeed's tag subdirectory; fixed so a checkpoint dir holds exactly one state
# Metrics of rl.grpo.SurrogateOutput that are masked means: aggregated over ranks weighted by their tokens.
_MEAN_METRICS = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "approx_kl", "ratio_mean",
                 "old_logp_mean")


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder of a Qwen2.5-VL model (``model.visual`` in older transformers, ``model.model.visual``
    in newer ones)."""
    for owner in (model, getattr(model, "model", None)):
        tower = getattr(owner, "visual", None) if owner is not None else None
        if isinstance(tower, nn.Module):
            return tower
    raise ValueError(f"{type(model).__name__} has no vision tower (.visual): policy.freeze_vision needs one")


def restrict_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter whose name no pattern matches (``re.search``; ``policy.trainable``) and return
    the names left trainable. A pattern that matches no parameter is an error naming it."""
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(re.search(p, n) for n in names)]
    if unmatched:
        raise ValueError(f"policy.trainable: {unmatched} match no parameter of {type(model).__name__}; "
                         f"its names look like {names[:2] + names[-2:]}")
    kept = []
    for name, param in model.named_parameters():
        if not any(re.search(p, name) for p in patterns):
            param.requires_grad_(False)
        elif param.requires_grad:  # (policy.freeze_vision wins over a pattern)
            kept.append(name)
    return kept


def tag_grammar(tokens: Any) -> tuple[list[int], frozenset[int]]:
    """For ``build_train_batch``'s stray-tag penalty: the ids of the tags the policy writes, in grammar order
    (rl.chain.WRITTEN_TAGS), and the ids of every opening and closing chain tag."""
    every = frozenset(tokens.single_token_id(t, "chain tag")
                      for tag in TAGS for t in (open_tag(tag), close_tag(tag)))
    return [tokens.single_token_id(tag, "chain tag") for tag in WRITTEN_TAGS], every


def section_tag_columns(tokens: Any) -> dict[int, int]:
    """Opening-tag token id -> column of ``build_train_batch``'s section table: 1 + index in TEXT_TAGS for
    the sections the policy writes, 0 (the text's own advantage) for the image sections. ``tokens``: the
    policy's ``rl.models.policy.ChainTokens``."""
    return {tokens.single_token_id(open_tag(tag), "opening tag"): TEXT_TAGS.index(tag) + 1 if tag in TEXT_TAGS
            else 0 for tag in TAGS}


# ============================================================================================ sharding (pure)
def masked_copy(batch: TrainBatch) -> TrainBatch:
    """The same rows with every loss position switched off: runs the forward/backward collectives of a
    rank that has no real work left, and contributes exactly zero loss, tokens and gradient."""
    return replace(
        batch,
        loss_mask=torch.zeros_like(batch.loss_mask),
        advantages=torch.zeros_like(batch.advantages),
        chain_advantages=torch.zeros_like(batch.chain_advantages),
        step_mask=torch.zeros_like(batch.step_mask),
    )


def shard_batch(
    batch: TrainBatch, rollouts: Sequence[Any], num_ranks: int
) -> list[tuple[TrainBatch, list[Any]]]:
    """Split a TrainBatch into ``num_ranks`` contiguous shards of near-equal size, each with its rollouts.

    ``rollouts`` is the list given to ``rl.grpo.build_train_batch`` (``batch.rows`` index it); its items
    may be Rollouts or anything standing for them (Ray object refs). A rank left without rows (fewer chains
    than ranks) gets a masked copy of row 0 so it still joins every collective.
    """
    n = len(batch)
    if n == 0:
        raise ValueError("empty TrainBatch (every group was filtered): the driver must skip this step")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    shards = []
    sizes = [n // num_ranks + (r < n % num_ranks) for r in range(num_ranks)]  # the first ranks take the rest
    for r in range(num_ranks):
        lo = sum(sizes[:r])
        hi = lo + sizes[r]
        if hi > lo:
            rows = list(range(lo, hi))
            sub = batch.select(rows)
        else:
            rows = [0]
            sub = masked_copy(batch.select(rows))
        shards.append((sub, [rollouts[batch.rows[i]] for i in rows]))
    return shards


def _check_alignment(batch: TrainBatch, rollouts: Sequence[Rollout]) -> None:
    if len(rollouts) != len(batch):
        raise ValueError(f"train_step got {len(batch)} batch rows but {len(rollouts)} rollouts (one per row)")
    for key, r in zip(batch.keys, rollouts):
        if key != (int(r.prompt_id), int(r.sample_index)):
            raise ValueError(f"batch row {key} is paired with rollout {(r.prompt_id, r.sample_index)}")


# ======================================================================================= the diffusion module
class TraceScorer(nn.Module):
    """The trainable parts of the SR pipeline (UNet, text encoder) as one module, so that one DeepSpeed
    engine owns them (and, under ZeRO-3, hooks them); ``forward(traces)`` re-scores recorded denoising
    steps with ``pipeline.trace_log_probs``. State-dict names are ``unet.*`` / ``text_encoder.*``, the
    pipeline's component names, which is what the rollout side loads."""

    def __init__(self, pipeline: Any):
        super().__init__()
        self.unet = pipeline.unet
        if getattr(pipeline, "text_encoder", None) is not None:
            self.text_encoder = pipeline.text_encoder
        self._pipeline = [pipeline]  # in a list: not registered as a submodule (no duplicate parameters)

    @property
    def pipeline(self) -> Any:
        return self._pipeline[0]

    def forward(
        self,
        traces: Sequence[Any] = (),
        stages: Optional[Sequence[Any]] = None,
        generator: Optional[torch.Generator] = None,
        noise_level: int = 20,
        prompt_dropout: float = 0.0,
    ) -> Tensor:
        """GRPO: (N, S) log-probs of recorded ``traces``. SFT (``stages`` given: ``rl.sft_data.StageTarget``s of
        one size): the scalar denoising MSE of ``pipeline.denoising_loss``. Both go through this forward so
        that DeepSpeed's hooks (ZeRO-3 gathers) see every use of the weights."""
        if stages is not None:
            return self.pipeline.denoising_loss(
                [s.target for s in stages], [s.condition for s in stages], [s.text for s in stages],
                generator=generator, noise_level=noise_level, prompt_dropout=prompt_dropout,
            )
        return self.pipeline.trace_log_probs(traces)  # (N, S) with grad


def load_sr_pipeline(path: str) -> Any:
    """``actors.sr_pipeline.SRPipeline.from_pretrained(path)`` (imported here: the policy-only learner
    does not need diffusers)."""
    from actors.sr_pipeline import SRPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"diffusion.path = {path!r}: no diffusers pipeline (model_index.json missing)"
        )
    return SRPipeline.from_pretrained(path)


# ============================================================================================ the worker
class LearnerWorker:
    """One rank of the DeepSpeed learner. Build it with ``from_config`` (or the sub-configs)."""

    def __init__(
        self,
        learner: LearnerConfig,
        policy: PolicyConfig,
        diffusion: DiffusionConfig,
        grpo: GRPOConfig,
        total_steps: int,
        dist_env: Optional[Mapping[str, str]] = None,
        logprob_temperature: float = 1.0,
        sft: Optional[SFTConfig] = None,
    ):
        """``total_steps``: trainer steps of the run (the LR schedule spans total_steps x update_epochs
        optimizer steps; with ``sft``, total_steps: one optimizer step per SFT step). ``dist_env``: RANK /
        WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for this rank (None: already in the environment).
        ``logprob_temperature``: see the module docstring. ``sft``: the cold-start config; ``sft_step`` needs
        it (None for a GRPO learner)."""
        self.cfg, self.policy_cfg, self.diffusion_cfg, self.grpo = learner, policy, diffusion, grpo
        self.sft = sft
        self.logprob_temperature = logprob_temperature
        self._configure_env(dist_env, learner.num_cpus)
        t0 = time.perf_counter()
        self.device = eng.init_distributed(learner.backend)
        self.rank, self.world_size = eng.rank(), eng.world_size()
        self.dtype = eng.torch_dtype(learner.dtype)
        self.optimizer_steps = 0
        optimizer_total = max(1, total_steps if sft is not None else total_steps * grpo.update_epochs)

        self.engines: dict[str, Any] = {}
        self.tokens = None  # rl.models.policy.ChainTokens of the policy (processor + token layout)
        self._tag_columns: Optional[dict[int, int]] = None  # section_tag_columns, on first use
        self._tag_grammar: tuple[list[int], frozenset[int]] = ([], frozenset())  # tag_grammar, on first use
        self.reference: Optional[nn.Module] = None
        if not policy.freeze:
            from rl.models.policy import ChainTokens

            self.tokens = ChainTokens.from_pretrained(policy.path)
            model = self._load_policy(policy.path)
            model.train()
            if policy.freeze_vision:
                vision_tower(model).requires_grad_(False)
            if policy.trainable is not None:
                restrict_trainable(model, policy.trainable)
            if policy.gradient_checkpointing:
                model.gradient_checkpointing_enable()
            self.engines["policy"] = eng.build_engine(model, learner.policy_optim, learner, optimizer_total)
            if needs_reference(grpo.kl_beta):
                self.reference = self._load_policy(policy.path).eval().requires_grad_(False)
        self.pipeline = None
        if not diffusion.freeze:
            self.pipeline = load_sr_pipeline(diffusion.path)
            self.pipeline.to(self.device)
            for module in _pipeline_modules(self.pipeline):
                module.requires_grad_(False)  # the VAE and anything else outside the TraceScorer stay frozen
            scorer = TraceScorer(self.pipeline).to(self.dtype).requires_grad_(True).train()
            self.engines["diffusion"] = eng.build_engine(
                scorer, learner.diffusion_optim, learner, optimizer_total
            )
        self.setup_seconds = time.perf_counter() - t0

    @classmethod
    def from_config(
        cls, cfg: ExperimentConfig, dist_env: Optional[Mapping[str, str]] = None, **kwargs: Any
    ) -> "LearnerWorker":
        kwargs.setdefault("sft", cfg.sft if cfg.mode == "sft" else None)
        return cls(
            cfg.learner, cfg.policy, cfg.diffusion, cfg.grpo, cfg.trainer.total_steps, dist_env, **kwargs
        )

    @staticmethod
    def _configure_env(dist_env: Optional[Mapping[str, str]], num_cpus: Optional[float] = None) -> None:
        """The one place this rank's process environment is changed: rank variables, offline flags, threads."""
        from rl.env import configure_process

        configure_process(num_cpus)
        for key, value in (dist_env or {}).items():
            os.environ[key] = str(value)

    def _load_policy(self, path: str) -> nn.Module:
        from transformers import Qwen2_5_VLForConditionalGeneration

        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"policy.path = {path!r}: no HF model there (config.json missing)")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
        return model.to(self.device)

    # ------------------------------------------------------------------ small helpers
    def info(self) -> dict[str, Any]:
        """Who this rank is and what it trains (the group waits on this after start-up)."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.device),
            "trained": sorted(self.engines),
            "zero_stage": self.cfg.zero_stage,
            "parameters": {
                k: sum(int(getattr(p, "ds_numel", p.numel())) for p in e.module.parameters())
                for k, e in self.engines.items()
            },
            "setup_seconds": self.setup_seconds,
        }

    def _engine(self, model: str):
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if model not in self.engines:
            raise ValueError(
                f"the {model} is frozen (config {model}.freeze = true): the learner does not train "
                "or hold it, so it has no weights to gather or sync"
            )
        return self.engines[model]

    def _all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        device = self.device if self.cfg.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        ops = {
            "sum": torch.distributed.ReduceOp.SUM,
            "max": torch.distributed.ReduceOp.MAX,
            "min": torch.distributed.ReduceOp.MIN,
        }
        torch.distributed.all_reduce(t, op=ops[op])
        return t.cpu().tolist()

    # ------------------------------------------------------------------ training
    def train_step(self, batch: TrainBatch, *rollouts: Rollout, sft_records: Sequence[Any] = ()
                   ) -> dict[str, float]:
        """GRPO update on this rank's shard: ``batch`` rows i pair with ``rollouts[i]``. Returns metrics
        aggregated over all ranks (identical on every rank). Rollouts are varargs so that Ray resolves
        object refs passed for them. ``sft_records``: this rank's target chains (``rl.sft_data.SFTRecord``,
        a zero-weight copy on a rank without) for the ``grpo.sft_coef`` cross-entropy term; every rank gets
        some or none."""
        t0 = time.perf_counter()
        self._validate(batch, rollouts)
        ptx_micro: list = []
        if self.grpo.sft_coef > 0 and sft_records and "policy" in self.engines:
            ptx_micro, ptx_tokens = self._target_micro_batches(sft_records, "train_step")
            ptx_micro = ptx_micro if ptx_tokens > 0 else []
        mb_size = self.cfg.micro_batch_size
        micro = [
            (batch.select(range(i, min(i + mb_size, len(batch)))), list(rollouts[i : i + mb_size]))
            for i in range(0, len(batch), mb_size)
        ]
        n_micro = int(self._all_reduce([len(micro)], "max")[0])
        while len(micro) < n_micro:  # keep collectives in step with the longest rank
            mb, rs = micro[-1]
            micro.append((masked_copy(mb), rs))

        # Diffusion loss only on micro-batches where every rank has traces to re-score (ZeRO collectives).
        has_traces = [float(any(len(r.traces) for r in rs)) for _, rs in micro]
        image_ok = (
            [v > 0 for v in self._all_reduce(has_traces, "min")]
            if "diffusion" in self.engines
            else [False] * n_micro
        )
        local_tokens = sum(mb.num_tokens for mb, _ in micro)
        local_steps = sum(mb.num_steps for (mb, _), ok in zip(micro, image_ok) if ok)
        global_tokens, global_steps = self._all_reduce([local_tokens, local_steps])
        train_text = "policy" in self.engines and global_tokens > 0
        train_image = "diffusion" in self.engines and global_steps > 0

        sums: dict[str, float] = {}
        extremes = {
            "text_ratio_max": -math.inf,
            "text_ratio_min": math.inf,
            "image_ratio_max": -math.inf,
            "image_ratio_min": math.inf,
        }
        lrs = {name: eng.current_lr(e) for name, e in self.engines.items()}
        norms: dict[str, list[float]] = {name: [] for name in self.engines}
        for _epoch in range(self.grpo.update_epochs):
            for (mb, rs), ok in zip(micro, image_ok):
                if train_text:
                    self._text_micro_step(mb, rs, global_tokens, sums, extremes)
                if train_image and ok:
                    self._image_micro_step(mb, rs, global_steps, sums, extremes)
            for mb, rs, _, _ in ptx_micro:
                self._sft_text_micro_step(mb, rs, ptx_tokens, sums, self.grpo.sft_coef, prefix="ptx_")
            stepped = False
            for name, e in self.engines.items():
                if (name == "policy" and (train_text or ptx_micro)) or (name == "diffusion" and train_image):
                    e.step()
                    norms[name].append(eng.grad_norm(e))
                    stepped = True
            self.optimizer_steps += int(stepped)
        return self._metrics(sums, extremes, norms, lrs, global_tokens, global_steps, len(batch), t0)

    def _validate(self, batch: TrainBatch, rollouts: Sequence[Rollout]) -> None:
        """Check the shard on every rank and agree on the outcome before the first collective, so a bad
        shard on one rank is an error on all ranks instead of a hang in the others' all-reduce."""
        error = None
        try:
            _check_alignment(batch, rollouts)
            if "policy" in self.engines:
                for row, r in enumerate(rollouts):
                    ids = batch.input_ids[row][batch.attention_mask[row]].tolist()
                    try:
                        self.tokens.check_context(ids, r.context_images)
                    except ValueError as exc:
                        raise ValueError(
                            f"rollout prompt_id={r.prompt_id} sample_index={r.sample_index}: {exc}"
                        ) from None
        except ValueError as exc:
            error = exc
        all_ok = self._all_reduce([0.0 if error else 1.0], "min")[0] > 0
        if error is not None:
            raise error
        if not all_ok:
            raise RuntimeError("train_step: another learner rank rejected its shard (its error says why)")

    def _text_micro_step(
        self,
        mb: TrainBatch,
        rs: Sequence[Rollout],
        global_tokens: float,
        sums: dict[str, float],
        extremes: dict[str, float],
    ) -> None:
        policy = self.engines["policy"]
        logp = self.policy_log_probs(policy, mb, rs)  # (B, L) float32, with grad
        old, adv, mask = (t.to(self.device) for t in (mb.old_log_probs, mb.advantages, mb.loss_mask))
        out = clipped_surrogate(logp, old, adv, mask, self.grpo.clip_low, self.grpo.clip_high)
        text_loss = token_mean(out.loss, mask, global_tokens)
        loss = self.grpo.text_loss_weight * text_loss
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = self.policy_log_probs(self.reference, mb, rs)
            kl = token_mean(k3_kl(logp, ref_logp), mask, global_tokens)
            loss = loss + self.grpo.kl_beta * kl
            _add(sums, "kl", kl.item())
        policy.backward(loss * eng.dp_loss_scale(), scale_wrt_gas=False)
        _add(sums, "text_loss", text_loss.item())
        _accumulate(sums, extremes, "text", out.metrics)

    def _image_micro_step(
        self,
        mb: TrainBatch,
        rs: Sequence[Rollout],
        global_steps: float,
        sums: dict[str, float],
        extremes: dict[str, float],
    ) -> None:
        diffusion = self.engines["diffusion"]
        logp = self.step_log_probs(diffusion, mb, rs)  # (B, S) with grad
        old, adv, mask = (
            t.to(self.device) for t in (mb.step_old_log_probs, mb.chain_advantages, mb.step_mask)
        )
        out = image_surrogate(logp.float(), old, adv, self.grpo.clip_low, self.grpo.clip_high, mask)
        image_loss = token_mean(out.loss, mask, global_steps)
        diffusion.backward(
            self.grpo.image_loss_weight * image_loss * eng.dp_loss_scale(), scale_wrt_gas=False
        )
        _add(sums, "image_loss", image_loss.item())
        _accumulate(sums, extremes, "image", out.metrics)

    def _metrics(
        self,
        sums: dict[str, float],
        extremes: dict[str, float],
        norms: dict[str, list[float]],
        lrs: dict[str, float],
        global_tokens: float,
        global_steps: float,
        chains: int,
        t0: float,
    ) -> dict[str, float]:
        """Sum the per-rank partial sums over ranks and turn them into batch means."""
        keys = sorted(sums)
        # Every rank holds the same key set: keys exist iff the (global) branch ran on every rank.
        totals = dict(zip(keys, self._all_reduce([sums[k] for k in keys])))
        maxima = self._all_reduce(
            [extremes[k] if "max" in k else -extremes[k] for k in sorted(extremes)], "max"
        )
        epochs = self.grpo.update_epochs
        m: dict[str, float] = {
            "tokens": global_tokens,
            "diffusion_steps": global_steps,
            "chains": self._all_reduce([chains])[0],
            "optimizer_steps": self.optimizer_steps,
        }
        for k in ("text_loss", "image_loss", "kl"):
            if k in totals:
                m[k] = totals[k] / epochs
        if "ptx_text_loss" in totals:  # grpo.sft_coef's cross-entropy on the target chains
            m["ptx_loss"] = totals["ptx_text_loss"] / epochs
            m["ptx_token_accuracy"] = totals["ptx_correct_tokens"] / totals["ptx_target_tokens"]
        for kind, count in (("text", global_tokens), ("image", global_steps)):
            for name in _MEAN_METRICS:
                if f"{kind}_{name}" in totals:
                    m[f"{kind}_{name}"] = totals[f"{kind}_{name}"] / (count * epochs)
        for k, v in zip(sorted(extremes), maxima):
            if math.isfinite(v):
                m[k] = v if "max" in k else -v
        for name, values in norms.items():
            if values:
                m[f"{name}_grad_norm"] = sum(values) / len(values)
            m[f"{name}_lr"] = lrs[name]
        m["seconds"] = time.perf_counter() - t0
        return m

    # ------------------------------------------------------------------ supervised cold start
    def sft_step(self, *records: Any) -> dict[str, float]:
        """One supervised step on this rank's ``rl.sft_data.SFTRecord``s (varargs, so Ray resolves refs):
        cross-entropy on the target text tokens, a token-mean over the GLOBAL target-token count, weighted
        ``sft.text_loss_weight``; plus the diffusion denoising MSE of every stage triple, a mean over the
        global (record, stage) count, weighted ``sft.image_loss_weight``. Same micro-batching, equal
        micro-batch count on every rank, clipping and LR schedule as ``train_step``; frozen models are skipped.
        Returns metrics aggregated over all ranks (identical on every rank)."""
        if self.sft is None:
            raise ValueError("sft_step: this learner was built without the sft config "
                             "(LearnerWorker(..., sft=cfg.sft), or a config with mode: sft)")
        t0 = time.perf_counter()
        micro, global_tokens = self._target_micro_batches(records, "sft_step")
        real = micro[0][3]
        local_images = sum(len(r.stages) for r in records) if real else 0
        global_images, global_records = self._all_reduce([local_images, len(records) if real else 0])
        train_text = "policy" in self.engines and global_tokens > 0
        train_image = "diffusion" in self.engines and global_images > 0

        sums: dict[str, float] = {}
        lrs = {name: eng.current_lr(e) for name, e in self.engines.items()}
        for k, (mb, rs, recs, is_real) in enumerate(micro):
            if train_text:
                self._sft_text_micro_step(mb, rs, global_tokens, sums, self.sft.text_loss_weight)
            if train_image:
                seed = ((self.optimizer_steps * 1009 + self.rank) * 1013 + k) % (2**31 - 1)
                self._sft_image_micro_step(recs, is_real, global_images, sums, seed)
        norms: dict[str, float] = {}
        for name, e in self.engines.items():
            if (name == "policy" and train_text) or (name == "diffusion" and train_image):
                e.step()
                norms[name] = eng.grad_norm(e)
        self.optimizer_steps += int(bool(norms))

        keys = sorted(sums)  # the same keys on every rank: each branch runs on all ranks or none
        totals = dict(zip(keys, self._all_reduce([sums[k] for k in keys])))
        m: dict[str, float] = {
            "tokens": global_tokens,
            "images": global_images,
            "records": global_records,
            "optimizer_steps": self.optimizer_steps,
        }
        if "text_loss" in totals:
            m["text_loss"] = totals["text_loss"]
            m["token_accuracy"] = totals["correct_tokens"] / global_tokens
        if "image_loss" in totals:
            m["image_loss"] = totals["image_loss"]
        for name in self.engines:
            if name in norms:
                m[f"{name}_grad_norm"] = norms[name]
            m[f"{name}_lr"] = lrs[name]
        m["seconds"] = time.perf_counter() - t0
        return m

    def _target_micro_batches(
        self, records: Sequence[Any], caller: str
    ) -> tuple[list[tuple[TrainBatch, list[Rollout], list[Any], bool]], float]:
        """``rl.sft_data.SFTRecord``s -> micro-batches (batch, rollouts, records, real), as many on every rank
        (the longest rank's count; padding copies carry no loss), and the global count of target tokens."""
        from rl.sft_data import to_rollout

        if not records:
            raise ValueError(f"{caller}: no records (a rank without data gets a zero-weight copy)")
        weights = {float(r.weight) for r in records}
        if not weights <= {0.0, 1.0} or len(weights) != 1:
            raise ValueError(f"{caller}: record weights must be all 1.0 (data) or all 0.0 (a padding copy), "
                             f"got {sorted(weights)}")
        real = weights == {1.0}
        rollouts = [to_rollout(r) for r in records]
        pad_id = self.tokens.tokenizer.pad_token_id if self.tokens is not None else 0
        batch = build_train_batch(rollouts, torch.zeros(len(rollouts)), pad_token_id=pad_id or 0)
        self._validate(batch, rollouts)
        mb_size = self.cfg.micro_batch_size
        micro = [
            (batch.select(range(i, min(i + mb_size, len(batch)))), rollouts[i : i + mb_size],
             list(records[i : i + mb_size]), real)
            for i in range(0, len(batch), mb_size)
        ]
        n_micro = int(self._all_reduce([len(micro)], "max")[0])
        (global_tokens,) = self._all_reduce([batch.num_tokens])
        while len(micro) < n_micro:  # keep collectives in step with the longest rank
            mb, rs, recs, _ = micro[-1]
            micro.append((masked_copy(mb), rs, recs, False))
        return micro, global_tokens

    def _sft_text_micro_step(
        self, mb: TrainBatch, rs: Sequence[Rollout], global_tokens: float, sums: dict[str, float],
        weight: float, prefix: str = "",
    ) -> None:
        policy = self.engines["policy"]
        logits, start = self._policy_logits(policy, mb, rs)  # (B, L - start, V), banned ids -inf
        ids = mb.input_ids.to(self.device)[:, start:]  # (B, L - start)
        mask = mb.loss_mask.to(self.device)[:, start:]
        logp = gather_token_log_probs(logits, ids, 1.0)  # (B, L - start), entry t: log p(ids[t] | < t)
        logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
        text_loss = token_mean(-logp, mask, global_tokens)
        policy.backward(weight * text_loss * eng.dp_loss_scale(), scale_wrt_gas=False)
        with torch.no_grad():
            correct = (logits[:, :-1].argmax(-1) == ids[:, 1:]) & mask[:, 1:].bool()  # logit t predicts t+1
        _add(sums, f"{prefix}text_loss", text_loss.item())
        _add(sums, f"{prefix}correct_tokens", float(correct.sum()))
        _add(sums, f"{prefix}target_tokens", float(mb.num_tokens))

    def _sft_image_micro_step(
        self, records: Sequence[Any], real: bool, global_images: float, sums: dict[str, float], seed: int
    ) -> None:
        """One forward per stage size over the micro-batch (the same count on every rank: ZeRO-3 gathers per
        forward), one backward; a padding micro-batch runs it at weight 0."""
        diffusion = self.engines["diffusion"]
        groups: dict[tuple, list[Any]] = {}
        for r in records:
            for st in r.stages:
                groups.setdefault((st.stage, st.target.shape, st.condition.shape), []).append(st)
        generator = torch.Generator().manual_seed(seed)
        dropout = 0.1 if self.diffusion_cfg.guidance_scale != 1.0 else 0.0  # CFG needs an unconditional model
        loss = None
        for stages in groups.values():
            mse = diffusion(stages=stages, generator=generator, noise_level=self.diffusion_cfg.noise_level,
                            prompt_dropout=dropout)
            part = mse * (len(stages) / global_images if real else 0.0)  # mean over the global triple count
            loss = part if loss is None else loss + part
        diffusion.backward(self.sft.image_loss_weight * loss * eng.dp_loss_scale(), scale_wrt_gas=False)
        _add(sums, "image_loss", loss.item())

    # ------------------------------------------------------------------ re-scoring
    def policy_log_probs(self, model: nn.Module, mb: TrainBatch, rollouts: Sequence[Rollout]) -> Tensor:
        """Log-probs (B, L) float32 of the exact rollout tokens (prompt + completion) under ``model``, with
        the context images (LR, rough, middle) as pixel inputs; entry t is log p(token t | tokens < t), 0
        before the first completion token. Logits are only computed from the shortest prompt on."""
        logits, start = self._policy_logits(model, mb, rollouts)
        input_ids = mb.input_ids.to(self.device)
        # (B, L - start): entry 0 is position `start`, a prompt token with no loss
        temperature = self.logprob_temperature if self.logprob_temperature > 0 else 1.0  # greedy: T = 1
        logp = gather_token_log_probs(logits, input_ids[:, start:], temperature)
        logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))  # banned image pads: no loss
        return F.pad(logp, (start, 0))  # (B, L)

    def _policy_logits(self, model: nn.Module, mb: TrainBatch, rollouts: Sequence[Rollout]) -> tuple[Tensor, int]:
        """Logits (B, L - start, V) of positions start..L-1 (start = shortest prompt - 1), banned ids -inf."""
        images = [im for r in rollouts for im in r.context_images]
        inputs = {k: v.to(self.device) for k, v in self.tokens.image_inputs(images).items()}
        input_ids = mb.input_ids.to(self.device)
        length = input_ids.shape[1]
        # the logit at position P-1 predicts the first completion token: nothing before it is needed
        start = max(int(mb.prompt_lengths.min()) - 1, 0)
        attention_mask = mb.attention_mask.to(self.device).long()
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            # transformers 5 builds Qwen2.5-VL's 3D M-RoPE positions only when told where the image pads
            # are; without it the forward silently uses 1D positions and disagrees with vLLM by nats.
            mm_token_type_ids=(input_ids == self.tokens.image_pad_id).int() * attention_mask,
            use_cache=False,
            logits_to_keep=length - start,
            **inputs,
        )
        logits = out.logits
        banned = self.tokens.banned_ids(logits.shape[-1])
        if banned:  # the engines never sample these: their log-probs are normalised over the other ids
            logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
        return logits, start

    def step_log_probs(self, scorer: nn.Module, mb: TrainBatch, rollouts: Sequence[Rollout]) -> Tensor:
        """Per-step log-probs (B, S) of each chain's traces, stages concatenated in trace order (the layout
        of ``TrainBatch.step_old_log_probs``), zero-padded to S."""
        traces = [t for r in rollouts for t in r.traces]
        per_trace = scorer(traces)  # (N_traces, S_max)
        width = mb.step_old_log_probs.shape[1]
        rows, k = [], 0
        for r in rollouts:
            parts = []
            for t in r.traces:
                parts.append(per_trace[k, : t.log_probs.numel()])
                k += 1
            row = torch.cat(parts) if parts else per_trace.new_zeros(0)
            rows.append(F.pad(row, (0, width - row.numel())))
        return torch.stack(rows)

    # ------------------------------------------------------------------ weights out
    def train_chains(self, advantages: Sequence[float], padding: bool, *rollouts: Rollout,
                     image_advantages: Optional[Sequence[float]] = None,
                     section_advantages: Optional[Sequence[Sequence[float]]] = None,
                     sft_records: Sequence[Any] = ()) -> dict[str, float]:
        """``train_step`` on this rank's own chains: the batch is built here from the rollouts, so the driver
        only ever holds refs. ``padding``: this rank got no chain and trains a masked copy (zero loss) to stay
        in step with the others' collectives. ``image_advantages``: the diffusion steps' own advantages
        (None: the text's); ``section_advantages``: per chain, one per rl.chain.TEXT_TAGS section (None: the
        text's everywhere); ``sft_records``: see ``train_step``."""
        pad_id = self.tokens.tokenizer.pad_token_id if self.tokens is not None else 0
        image_adv = None if image_advantages is None else torch.tensor(image_advantages, dtype=torch.float32)
        sections = None
        penalty = self.grpo.stray_tag_penalty if self.tokens is not None else 0.0  # (a frozen policy: no text)
        if self.tokens is not None and self._tag_columns is None:  # the tags' ids do not change: look up once
            self._tag_columns, self._tag_grammar = section_tag_columns(self.tokens), tag_grammar(self.tokens)
        if section_advantages is not None and self.tokens is not None:
            sections = torch.tensor(section_advantages, dtype=torch.float32)
        batch = build_train_batch(list(rollouts), torch.tensor(advantages, dtype=torch.float32),
                                  pad_token_id=pad_id or 0, image_advantages=image_adv,
                                  section_advantages=sections, tag_columns=self._tag_columns,
                                  stray_tag_penalty=penalty, tag_order=self._tag_grammar[0],
                                  tag_ids=self._tag_grammar[1])
        if padding:
            batch = masked_copy(batch)
        return self.train_step(batch, *rollouts, sft_records=sft_records)

    def serialized_state(self, model: str) -> tuple[list[bytes], dict[str, float]]:
        """Rank 0: the full weights of ``model`` as safetensors buckets of ``learner.sync_bucket_mb`` (ready for
        the object store); other ranks: []. A collective (ZeRO-3 gathers): all ranks must call it."""
        start = time.perf_counter()
        state = self.gather_full_state(model)
        blobs = [serialize_bucket(b) for b in bucket_named_tensors(state.items(), self.cfg.sync_bucket_mb << 20)]
        return blobs, {"bytes": float(sum(len(b) for b in blobs)), "buckets": float(len(blobs)),
                       "tensors": float(len(state)), "seconds": time.perf_counter() - start}

    def gather_full_state(self, model: str) -> dict[str, Tensor]:
        """Full CPU weights of ``model`` ("policy" | "diffusion") on rank 0, {} on the others. A collective:
        ALL ranks must call it (ZeRO-3 all-gathers, a bucket at a time)."""
        module = self._engine(model).module
        full = eng.iter_full_state(module, bucket_bytes=self.cfg.sync_bucket_mb << 20)
        if self.rank == 0:
            return dict(full)
        for _ in full:
            pass
        return {}

    def parameter_digest(self, model: str) -> dict[str, float]:
        """Sum of each parameter as this rank holds it (its shard under ZeRO-3). Equal on every rank for
        ZeRO 0-2, whose ranks keep full replicas: a cheap check that replicas did not diverge."""
        module = self._engine(model).module
        return {
            n: float(getattr(p, "ds_tensor", p).detach().double().sum()) for n, p in module.named_parameters()
        }

    def export_hf(self, directory: str) -> dict[str, str]:
        """Write ``directory/policy`` (HF: weights, config, processor; loadable by from_pretrained and vLLM)
        and ``directory/diffusion`` (the diffusers pipeline) on rank 0. A frozen model is copied from its
        configured path. A collective under ZeRO-3: all ranks must call it. Returns {model: path} on rank 0.
        """
        out = Path(directory)
        written: dict[str, str] = {}
        if "policy" in self.engines:
            state = self.gather_full_state("policy")
            if self.rank == 0:
                target = out / "policy"
                self.engines["policy"].module.save_pretrained(
                    target, state_dict=state, safe_serialization=True
                )
                self.tokens.processor.save_pretrained(target)
                written["policy"] = str(target)
        elif self.rank == 0:
            written["policy"] = _copy_dir(self.policy_cfg.path, out / "policy")
        if "diffusion" in self.engines:
            module = self.engines["diffusion"].module
            # diffusers' save_pretrained takes no state_dict: gather the whole module for the save
            with eng.full_parameters(module.parameters()):
                if self.rank == 0:
                    module.pipeline.save_pretrained(out / "diffusion")
                    written["diffusion"] = str(out / "diffusion")
        elif self.rank == 0:
            written["diffusion"] = _copy_dir(self.diffusion_cfg.path, out / "diffusion")
        if self.world_size > 1:
            torch.distributed.barrier()
        return written

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> None:
        """DeepSpeed checkpoint of every trained model (weights, optimizer and LR-scheduler state, each rank
        its own ZeRO shard) under ``directory/<model>/``. All ranks; ``directory`` must be on storage every
        rank can reach (one node, or a shared filesystem)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, e in self.engines.items():
            e.save_checkpoint(
                str(out / name), tag=CHECKPOINT_TAG, client_state={"optimizer_steps": self.optimizer_steps}
            )
        if self.rank == 0:
            state = {
                "optimizer_steps": self.optimizer_steps,
                "trained": sorted(self.engines),
                "world_size": self.world_size,
                "zero_stage": self.cfg.zero_stage,
            }
            (out / WORKER_STATE_FILE).write_text(json.dumps(state, indent=1))
        if self.world_size > 1:
            torch.distributed.barrier()

    def load_checkpoint(self, directory: str) -> None:
        """Restore what ``save_checkpoint`` wrote (same world size and ZeRO stage). All ranks."""
        src = Path(directory)
        state_file = src / WORKER_STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: not a learner checkpoint (missing {WORKER_STATE_FILE})")
        state = json.loads(state_file.read_text())
        missing = sorted(set(self.engines) - set(state.get("trained", [])))
        if missing:
            raise ValueError(
                f"{src}: checkpoint has no state for {missing} (trained then: {state.get('trained')})"
            )
        for key, mine in (("world_size", self.world_size), ("zero_stage", self.cfg.zero_stage)):
            if state.get(key) != mine:
                raise ValueError(f"{state_file}: saved with {key}={state.get(key)}, this learner has {mine}")
        for name, e in self.engines.items():
            path, _client_state = e.load_checkpoint(
                str(src / name), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise FileNotFoundError(
                    f"{src / name}: DeepSpeed found no checkpoint (tag {CHECKPOINT_TAG!r})"
                )
        self.optimizer_steps = int(state["optimizer_steps"])


# ============================================================================================ helpers
def _add(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


def _accumulate(
    sums: dict[str, float], extremes: dict[str, float], kind: str, metrics: Mapping[str, Tensor]
) -> None:
    """Token-weighted sums of the masked-mean metrics, and running extremes of the ratio."""
    tokens = float(metrics["tokens"])
    for name in _MEAN_METRICS:
        _add(sums, f"{kind}_{name}", float(metrics[name]) * tokens)
    if tokens > 0:
        extremes[f"{kind}_ratio_max"] = max(extremes[f"{kind}_ratio_max"], float(metrics["ratio_max"]))
        extremes[f"{kind}_ratio_min"] = min(extremes[f"{kind}_ratio_min"], float(metrics["ratio_min"]))


def _pipeline_modules(pipeline: Any) -> list[nn.Module]:
    components = getattr(pipeline, "components", None) or vars(pipeline)
    return [m for m in components.values() if isinstance(m, nn.Module)]


def _copy_dir(src: str, dst: Path) -> str:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return str(dst)
