"""``rollout.engine`` -> a text engine: the factory over ``actors.vllm_engine`` and ``actors.hf_engine`` (each imported
only when asked for: the HF engine runs where vLLM is not installed)."""

from __future__ import annotations

from actors.text_engine import TextEngine, TextEngineSpec


def build_text_engine(engine: str, spec: TextEngineSpec) -> TextEngine:
    """``rollout.engine`` -> an engine: "vllm" or "hf", built from ``spec`` (``actors.text_engine.TextEngineSpec``:
    the rollout worker's is ``actors.rollout.text_engine_spec``)."""
    if engine == "vllm":
        from actors.vllm_engine import VLLMTextEngine

        return VLLMTextEngine(spec)
    if engine == "hf":
        from actors.hf_engine import HFTextEngine

        return HFTextEngine(spec)
    raise ValueError(f"rollout.engine = {engine!r}: must be vllm or hf")
