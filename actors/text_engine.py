"""Text engines: sample the policy's next turn from a token-id context with images (vLLM, or HF as a
fallback).

Both engines implement ``TextEngine``:

* ``generate(requests) -> list[list[TextSample]]``: each ``TextRequest`` is a canonical context (token ids
  with every image expanded to its vision tokens, see ``models.policy.ChainTokens``) plus its images in
  token order, ``n`` samples, the turn's stop token ids and a token budget. Each sample returns the sampled
  ids (the stop or EOS token included, so ``context + token_ids`` is exactly what the policy produced), their
  log-probs, the text, and the finish reason.
* ``load_weights(named_tensors, version)``: replace every policy weight in place (HF parameter names, e.g.
  ``model.language_model.layers.0.mlp.up_proj.weight``); afterwards ``version`` is the engine's version.

Log-probs are those of the distribution the token was sampled from: ``log_softmax(logits / temperature)`` over
the vocabulary minus ``ChainTokens.banned_ids`` (vision tokens and padded rows, which are never sampled),
after top-k / top-p truncation (renormalised over the kept tokens) when those are enabled; for greedy decoding
(temperature 0) the same without the temperature. With the default top_p = 1 and top_k = -1 the learner
reproduces them with a teacher-forced forward, logits divided by the same temperature and the same ids masked
(``models.policy.sequence_log_probs(model, inputs, temperature, banned_ids)``). vLLM is run with
``logprobs_mode="processed_logprobs"`` for this (its default, raw log-probs, ignores the temperature); HF
``generate`` scores are the processed logits.

A turn is multi-turn-exact: the rollout appends the sampled ids and the inserted image section ids
(``ChainTokens.image_section_ids``) to the context, and the learner forwards that same sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, Protocol, Sequence, runtime_checkable

import torch

from core.config import SamplingConfig, VLLMConfig
from core.images import ImageLike
from core.model_config import LoraConfig
from core.weights import deserialize_blobs
from models.chain_tokens import ChainTokens
from models.policy import PathLike, load_processor

FinishReason = Literal["stop", "eos", "length"]
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class TextEngineSpec:
    """What a text engine is built from, whichever it is (``actors.engines.build_text_engine``): made once from the
    config (``actors.rollout.text_engine_spec``; a tool or test names the fields it needs) and passed whole."""

    policy_path: PathLike  # the policy's HF directory (weights, tokenizer, processor)
    sampling: SamplingConfig  # the default sampling of ``generate``
    max_tokens: int  # a turn's default token budget (chain.max_stage_tokens)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # vLLM's engine settings (the HF engine ignores them)
    dtype: str = "float32"
    device: str = "cpu"  # the HF engine's device (vLLM places itself)
    seed: int = 0  # vLLM's engine seed
    # vLLM's weight-transfer engine (actors.vllm_worker): nccl / cpu_gloo (the learner's collective) or
    # safetensors_bytes (object-store buckets); the HF engine loads tensors in its own process
    transfer: str = "safetensors_bytes"
    # the policy's adapters, when a sync ships them alone: vLLM serves them as LoRA, the HF model gets the same
    # adapters injected (by the learner's names; B = 0 until the first sync)
    lora: Optional[LoraConfig] = None
    max_loras: int = 1  # vLLM: adapter versions served at once (trainer.max_staleness + 1)


@dataclass(frozen=True)
class TextRequest:
    """One context to continue, ``n`` times."""

    # (L,) canonical ids: image pads expanded (ChainTokens.prompt_ids / image_section_ids)
    context_ids: Sequence[int]
    images: Sequence[ImageLike]  # images of the context in token order (LR, then the fed-back stage images)
    stop_token_ids: Sequence[int]  # the turn ends after any of these (ChainTokens.stop_ids[turn.stage])
    n: int = 1
    max_tokens: Optional[int] = None  # None: the engine's default (chain.max_stage_tokens)
    seed: Optional[int] = None  # None: derived from sampling.seed when that is set, else random


@dataclass(frozen=True)
class TextSample:
    """One sampled continuation."""

    token_ids: tuple[int, ...]  # (T,) sampled ids, the stop / EOS token included when generated
    log_probs: tuple[float, ...]  # (T,) sampling log-probs of token_ids (see module docstring)
    text: str  # token_ids decoded, chain tags kept, Qwen special tokens dropped
    finish_reason: FinishReason  # stop: the turn's closing tag | eos: <|im_end|> / <|endoftext|> | length


@runtime_checkable
class TextEngine(Protocol):
    tokens: ChainTokens  # builds contexts consistently for engine and learner
    version: int  # policy version of the loaded weights

    def generate(
        self, requests: Sequence[TextRequest], sampling: Optional[SamplingConfig] = None
    ) -> list[list[TextSample]]:
        """One list of ``request.n`` samples per request, in request order; ``sampling`` overrides the
        engine's (e.g. temperature 0 for greedy evaluation)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace all policy weights in place (HF names); the iterable is consumed once and may stream."""
        ...

    def close(self) -> None:
        """Release the engine now (idempotent); its owner calls it before building another in the process."""
        ...


def finish_reason(token_ids: Sequence[int], stop_ids: set[int], eos_ids: set[int]) -> FinishReason:
    if token_ids and token_ids[-1] in stop_ids:
        return "stop"
    if token_ids and token_ids[-1] in eos_ids:
        return "eos"
    return "length"


def validate_requests(requests: Sequence[TextRequest], tokens: ChainTokens, default_max: int) -> None:
    for i, r in enumerate(requests):
        if r.n < 1:
            raise ValueError(f"request {i}: n = {r.n} must be >= 1")
        if (r.max_tokens if r.max_tokens is not None else default_max) < 1:
            raise ValueError(f"request {i}: max_tokens = {r.max_tokens} must be >= 1")
        if not r.stop_token_ids:
            raise ValueError(f"request {i}: stop_token_ids is empty (pass ChainTokens.stop_ids[stage])")
        tokens.check_context(r.context_ids, r.images)


class RequestSeeds:
    """Per-request seeds: the request's own, else ``base`` + a running counter (reproducible runs), else None.
    """

    def __init__(self, base: Optional[int]):
        self.base = base
        self.counter = itertools.count()

    def __call__(self, request: TextRequest) -> Optional[int]:
        if request.seed is not None:
            return request.seed
        if self.base is None:
            return None
        return (self.base * 1_000_003 + next(self.counter)) % (2**31)

class BaseTextEngine:
    """What both engines share: the policy's token layout, the EOS ids, the default sampling, seeds, and the
    ``generate`` contract (requests checked, then ``_generate`` on a non-empty list)."""

    def __init__(self, spec: TextEngineSpec):
        self.spec = spec
        self.sampling = spec.sampling
        self.max_tokens = spec.max_tokens
        self.tokens = ChainTokens.from_processor(load_processor(spec.policy_path))
        self.eos_ids = {self.tokens.tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}
        self.version = 0
        self._seeds = RequestSeeds(spec.sampling.seed)

    def generate(self, requests: Sequence[TextRequest], sampling: Optional[SamplingConfig] = None
                 ) -> list[list[TextSample]]:
        validate_requests(requests, self.tokens, self.max_tokens)
        if not requests:
            return []
        return self._generate(requests, sampling or self.sampling)

    def _generate(self, requests: Sequence[TextRequest], sampling: SamplingConfig) -> list[list[TextSample]]:
        raise NotImplementedError

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        raise NotImplementedError

    def load_weight_blobs(self, blobs: Iterable[bytes], version: int) -> None:
        """Serialised buckets (``core.weights.serialize_bucket``), loaded one at a time."""
        self.load_weights(deserialize_blobs(blobs), version)

    def close(self) -> None:
        """Nothing to release beyond what the garbage collector frees."""
