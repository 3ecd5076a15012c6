"""``rollout.engine`` -> a text engine: the factory over ``actors.vllm_engine`` and ``actors.hf_engine`` (each imported
only when asked for: the HF engine runs where vLLM is not installed)."""

from __future__ import annotations

from typing import Optional

from actors.text_engine import TextEngine
from core.config import SamplingConfig, VLLMConfig
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
) -> TextEngine:
    """``rollout.engine`` -> an engine: "vllm" or "hf". ``transfer``: vLLM's weight-transfer engine
    (``actors.vllm_worker``; the HF engine loads tensors in its own process)."""
    if engine == "vllm":
        from actors.vllm_engine import VLLMTextEngine

        return VLLMTextEngine(policy_path, sampling, max_tokens, vllm=vllm, dtype=dtype, seed=seed,
                              transfer=transfer)
    if engine == "hf":
        from actors.hf_engine import HFTextEngine

        return HFTextEngine(policy_path, sampling, max_tokens, dtype=dtype, device=device)
    raise ValueError(f"rollout.engine = {engine!r}: must be vllm or hf")
