"""vLLM as the cluster runs it, on the CPU: the EngineCore in its own process (``rollout.vllm.in_process: false``),
tensor parallelism 2, new weights received inside every vLLM worker through vLLM's weight-transfer API
(``actors.vllm_worker``'s ``cpu_gloo`` engine, the learner's ``learner.transfer`` sender), bucket by bucket, and
the sampling parameters the GPU runner accepts.

This process plays the rollout actor (it holds the ``LLM``) and the learner's rank 0 (it sends); the weights must
arrive in the worker processes. "The learner" is an HF model with other weights: after the update the engine's
sampling log-probs equal the learner's teacher-forced ones within float32 tolerance, and before it they differ.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from actors.text_engine import TextEngineSpec, TextRequest
from core.config import SamplingConfig, TinyPolicyConfig, VLLMConfig
from learner.transfer import open_sender, transfer_init, update_info
from models.chain_tokens import sequence_log_probs
from models.policy import load_policy, load_processor
from models.tiny import build_tiny_policy

pytestmark = pytest.mark.slow
SAMPLING = SamplingConfig(temperature=1.0, seed=0)
BUCKET = 1 << 16  # 64 KiB packed chunks: a ~3 MB policy travels in dozens of them


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny policy with sharp random weights (the engine starts from it) and the learner's: other weights."""
    root = tmp_path_factory.mktemp("transfer")
    base = build_tiny_policy(TinyPolicyConfig(), root / "base")
    out = {}
    for name, seed in (("engine", 1), ("learner", 2)):
        model = load_policy(base)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
        model.save_pretrained(root / name)
        load_processor(base).save_pretrained(root / name)
        out[name] = root / name
    out["learner_model"] = load_policy(out["learner"])
    return out


def _request(tokens) -> TextRequest:
    lr, rough = _image(16, 16, 0), _image(16, 24, 1)
    ctx = tokens.prompt_ids(lr) + tokens.tokenizer.encode("<degradation>light blur</degradation>",
                                                          add_special_tokens=False)
    ctx += tokens.image_section_ids("rough", rough)
    return TextRequest(ctx, [lr, rough], [tokens.stop_ids["middle"]], n=2, max_tokens=8)


def _gap(engine, learner, request) -> float:
    """Largest |engine log-prob - learner log-prob| over the engine's samples of ``request``."""
    t = engine.tokens
    samples = engine.generate([request])[0]
    contexts = [list(request.context_ids) + list(s.token_ids) for s in samples]
    inputs = t.batch_inputs(contexts, [request.images] * len(samples))
    banned = t.banned_ids(learner.config.get_text_config().vocab_size)
    with torch.no_grad():
        lp = sequence_log_probs(learner, inputs, temperature=SAMPLING.temperature, banned_ids=banned)
    P = len(request.context_ids)
    return max((lp[i, P:P + len(s.token_ids)] - torch.tensor(s.log_probs)).abs().max().item()
               for i, s in enumerate(samples))


def _sync(engine, learner, free_port, tp: int, version: int) -> None:
    """Learner rank 0 and the engine's TP workers form the transfer group; one update, sent as it is received."""
    state = {n: t.detach() for n, t in learner.state_dict().items()}
    init = transfer_init("cpu_gloo", "127.0.0.1", free_port(), 1 + tp, BUCKET, timeout_s=120)
    joined = threading.Thread(target=engine.join_transfer, args=({**init, "rank_offset": 1},))
    joined.start()
    sender = open_sender("cpu_gloo", init)
    joined.join()
    info = update_info(state.items())
    receiving = threading.Thread(target=engine.receive, args=(info, version))
    receiving.start()
    stats = sender.send(state.items(), info)
    receiving.join()
    assert engine.version == version and stats.num_buckets > 10


@pytest.mark.parametrize("tp", [1, 2], ids=["multiprocess", "tp2"])
def test_weights_arrive_in_every_vllm_worker_process(models, free_port, tp):
    from actors.vllm_engine import VLLMTextEngine

    engine = VLLMTextEngine(TextEngineSpec(models["engine"], SAMPLING, 8, transfer="cpu_gloo",
                                           vllm=VLLMConfig(in_process=False, tensor_parallel_size=tp)))
    try:
        learner = models["learner_model"]
        request = _request(engine.tokens)
        before = _gap(engine, learner, request)
        _sync(engine, learner, free_port, tp, version=1)
        after = _gap(engine, learner, request)
        assert after < 1e-4 and before > 1e-2, (before, after)  # float32 kernels: ~1e-6 after the update
        stats = engine.transfer_stats()
        assert len(stats) == tp  # every TP rank received, each bucket by bucket
        largest = max(t.numel() * t.element_size() for t in learner.state_dict().values())
        total = sum(t.numel() * t.element_size() for t in learner.state_dict().values())
        for s in stats:
            assert s["chunks"] > 10 and s["bytes"] == total
            assert s["peak_chunk_bytes"] <= BUCKET + largest < total / 4  # one chunk held, never the model
    finally:
        engine.close()


def test_adapter_sync_serves_what_merged_sync_serves(models):
    """``policy.lora.sync: adapters``: vLLM serves the learner's LoRA adapters over its base weights (and reloads the
    saved final norm); its sampling log-probs equal those of an engine given the merged weights, and the adapter
    sync moves a fraction of the bytes."""

    from actors.vllm_engine import VLLMTextEngine
    from core.model_config import LoraConfig
    from models import lora

    cfg = LoraConfig(rank=8, alpha=16, target_modules=[r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$"],
                     modules_to_save=[r"language_model\.norm$"])
    learner = load_policy(models["engine"])
    scalings = lora.add_lora(learner, cfg, "policy.lora")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained state: adapters and the saved norm away from their start
        for name, p in learner.named_parameters():
            if lora.is_trained(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "norm" in name else 0.0))
    raw = {n: t.detach().clone() for n, t in learner.state_dict().items()}
    shipped = {"adapters": lora.trained_state(raw), "merged": lora.merge_lora(raw, scalings)}
    mb = {k: sum(t.numel() * t.element_size() for t in v.values()) / 2**20 for k, v in shipped.items()}
    assert mb["adapters"] < mb["merged"] / 10, mb
    out = {}
    for mode in ("adapters", "merged"):
        engine = VLLMTextEngine(TextEngineSpec(models["engine"], SAMPLING, 8,
                                               lora=cfg if mode == "adapters" else None, max_loras=2))
        try:
            request = _request(engine.tokens)
            before = engine.generate([request])[0]
            engine.load_weights(shipped[mode].items(), version=1)
            out[mode] = engine.generate([request])[0]
        finally:
            engine.close()
    for a, m in zip(out["adapters"], out["merged"]):
        assert a.token_ids == m.token_ids
        assert np.allclose(a.log_probs, m.log_probs, atol=1e-5), (a.log_probs, m.log_probs)
    assert any(b.token_ids != a.token_ids or not np.allclose(b.log_probs, a.log_probs, atol=1e-3)
               for b, a in zip(before, out["adapters"]))  # the sync changed what is served
