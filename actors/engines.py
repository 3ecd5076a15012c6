"""``rollout.engine`` -> a text engine: the factory over ``actors.vllm_engine`` and ``actors.hf_engine`` (each imported
only when asked for: the HF engine runs where vLLM is not installed)."""

from __future__ import annotations

from typing import Optional

from actors.text_engine import TextEngine
from core.config import SamplingConfig, VLLMConfig
from core.model_config import LoraConfig
from models.policy import PathLike


def build_text_engine(
    engine: str,
    policy_path: PathLike,
    sampling: SamplingConfig,
    max_tokens: int,
    vllm: Optional[VLLMConfig] = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    transfer: str = "safetensors_bytes",
    lora: Optional[LoraConfig] = None,
    max_loras: int = 1,
) -> TextEngine:
    """``rollout.engine`` -> an engine: "vllm" or "hf". ``transfer``: vLLM's weight-transfer engine
    (``actors.vllm_worker``; the HF engine loads tensors in its own process). ``lora``: the policy's adapters, when
    a sync ships them alone (vLLM serves them as LoRA, ``max_loras`` versions at once; the HF model gets the same
    adapters injected)."""
    if engine == "vllm":
        from actors.vllm_engine import VLLMTextEngine

        return VLLMTextEngine(policy_path, sampling, max_tokens, vllm=vllm, dtype=dtype, seed=seed,
                              transfer=transfer, lora=lora, max_loras=max_loras)
    if engine == "hf":
        from actors.hf_engine import HFTextEngine
        from models.lora import add_lora

        hf = HFTextEngine(policy_path, sampling, max_tokens, dtype=dtype, device=device)
        if lora is not None:  # the learner's adapters by the learner's names; B = 0 until the first sync
            add_lora(hf.model, lora, "policy.lora")
            hf.model.requires_grad_(False)
        return hf
    raise ValueError(f"rollout.engine = {engine!r}: must be vllm or hf")
