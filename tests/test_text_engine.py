"""Text engines (vLLM and the HF fallback): token-exact multi-turn multimodal continuation, sampling log-probs
that the learner's teacher-forced HF forward reproduces, stopping at the turn's closing tag, in-place weight
updates.

The tiny policy is re-initialised with larger weights (std 0.15 instead of 0.02) so attention is sharp: with
the bootstrap's near-uniform weights, wrong positions or a wrong image would barely move the log-probs and
these comparisons could not fail.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.engines import build_text_engine
from actors.hf_engine import HFTextEngine
from actors.text_engine import TextEngine, TextEngineSpec, TextRequest, TextSample, finish_reason
from core.config import SamplingConfig, TinyPolicyConfig
from models.chain_tokens import ChainTokens, sequence_log_probs
from models.policy import load_policy, load_processor
from models.tiny import build_tiny_policy

MAX_TOKENS = 10
SAMPLING = SamplingConfig(temperature=1.0, top_p=1.0, top_k=-1, seed=0)
GREEDY = SamplingConfig(temperature=0.0)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    base = build_tiny_policy(TinyPolicyConfig(), root / "base")
    model = load_policy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(root / "sharp")
    load_processor(base).save_pretrained(root / "sharp")
    return root / "sharp"


@pytest.fixture(scope="module")
def hf_engine(policy_dir) -> HFTextEngine:
    return HFTextEngine(TextEngineSpec(policy_dir, SAMPLING, MAX_TOKENS))


@pytest.fixture(scope="module")
def vllm_engine(policy_dir):
    from actors.vllm_engine import VLLMTextEngine

    engine = VLLMTextEngine(TextEngineSpec(policy_dir, SAMPLING, MAX_TOKENS))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(policy_dir):
    """An independent HF model (not the engine's) for teacher-forced scoring."""
    return load_policy(policy_dir)


def _banned(model, tokens: ChainTokens) -> list[int]:
    return tokens.banned_ids(model.config.get_text_config().vocab_size)


def _score(model, tokens: ChainTokens, contexts, images) -> list[torch.Tensor]:
    """Teacher-forced log-probs, one (L,) row per context (right-padded batch, as the learner does)."""
    inputs = tokens.batch_inputs(contexts, images)
    with torch.no_grad():
        lp = sequence_log_probs(
            model, inputs, temperature=SAMPLING.temperature, banned_ids=_banned(model, tokens)
        )
    return [lp[i, : len(c)] for i, c in enumerate(contexts)]


def _check_against_forward(
    model, tokens, request: TextRequest, samples: list[TextSample], tol: float
) -> float:
    contexts = [list(request.context_ids) + list(s.token_ids) for s in samples]
    worst = 0.0
    for s, ctx, lp in zip(
        samples, contexts, _score(model, tokens, contexts, [request.images] * len(samples))
    ):
        got = lp[len(request.context_ids) :]
        diff = (got - torch.tensor(s.log_probs)).abs().max().item()
        assert diff < tol, f"log-probs differ by {diff}"
        worst = max(worst, diff)
    return worst


def _common_checks(tokens, request: TextRequest, samples: list[TextSample], banned: list[int]) -> None:
    assert len(samples) == request.n
    for s in samples:
        assert not set(s.token_ids) & set(banned)  # ~25% of the random model's mass sits on banned ids
        assert 1 <= len(s.token_ids) == len(s.log_probs) <= (request.max_tokens or MAX_TOKENS)
        assert s.text == tokens.decode(s.token_ids)
        assert all(lp <= 0 for lp in s.log_probs)
        assert s.finish_reason == finish_reason(
            s.token_ids, set(request.stop_token_ids), {tokens.eos_id, tokens.tokenizer.pad_token_id}
        )


def test_finish_reason_and_protocol(hf_engine):
    assert finish_reason([5, 7], {7}, {9}) == "stop"
    assert finish_reason([5, 9], {7}, {9}) == "eos"
    assert finish_reason([5, 6], {7}, {9}) == "length"
    assert isinstance(hf_engine, TextEngine)
    with pytest.raises(ValueError, match="rollout.engine"):
        build_text_engine("sglang", TextEngineSpec("x", SAMPLING, 8))


def test_bad_requests_are_refused(hf_engine):
    t = hf_engine.tokens
    lr = _image(16, 16, 0)
    with pytest.raises(ValueError, match="do not match"):
        hf_engine.generate([TextRequest(t.prompt_ids(lr), [lr, lr], [t.stop_ids["rough"]])])
    with pytest.raises(ValueError, match="stop_token_ids"):
        hf_engine.generate([TextRequest(t.prompt_ids(lr), [lr], [])])


def test_hf_engine_batched_logprobs_match_forward(hf_engine, reference):
    """Two requests of different lengths share one left-padded generate call; each row matches its own
    forward."""
    t = hf_engine.tokens
    lr0, lr1, rough = _image(16, 16, 0), _image(24, 16, 1), _image(32, 32, 2)
    r0 = TextRequest(t.prompt_ids(lr0), [lr0], [t.stop_ids["rough"]], n=2)
    ctx1 = t.prompt_ids(lr1) + t.tokenizer.encode(
        "<degradation>light blur</degradation>", add_special_tokens=False
    )
    ctx1 += t.image_section_ids("rough", rough)
    r1 = TextRequest(ctx1, [lr1, rough], [t.stop_ids["middle"]], n=1, max_tokens=6)
    out = hf_engine.generate([r0, r1])
    assert [len(o) for o in out] == [2, 1]
    for req, samples in zip((r0, r1), out):
        _common_checks(t, req, samples, _banned(reference, t))
        _check_against_forward(reference, t, req, samples, tol=1e-4)


@pytest.mark.slow
def test_vllm_multiturn_logprobs_match_hf_forward(vllm_engine, reference):
    """Three turns, images fed back between them; the learner's forward reproduces vLLM's sampling log-probs.
    """
    t = vllm_engine.tokens
    lrs = [_image(16, 16, 10), _image(16, 24, 11)]
    requests = [TextRequest(t.prompt_ids(lr), [lr], [t.stop_ids["rough"]], n=2) for lr in lrs]
    stage_images = {
        "rough": _image(16, 24, 12),
        "middle": _image(32, 48, 13),
    }  # non-square: 3D positions matter
    worst = 0.0
    for k, stage in enumerate(("rough", "middle", "final")):
        out = vllm_engine.generate(requests)
        for req, samples in zip(requests, out):
            _common_checks(t, req, samples, _banned(reference, t))
            worst = max(worst, _check_against_forward(reference, t, req, samples, tol=1e-3))
        if stage == "final":
            break
        nxt = ("middle", "final")[k]
        requests = [
            TextRequest(
                list(r.context_ids) + list(o[0].token_ids) + t.image_section_ids(stage, stage_images[stage]),
                list(r.images) + [stage_images[stage]],
                [t.stop_ids[nxt]],
                n=2,
            )
            for r, o in zip(requests, out)
        ]
    assert all(len(r.images) == 3 for r in requests)
    # The comparison can fail: without mm_token_type_ids HF silently uses 1D positions, unlike vLLM.
    last = requests[0]
    sample = vllm_engine.generate([last])[0][0]
    inputs = t.batch_inputs([list(last.context_ids) + list(sample.token_ids)], [last.images])
    inputs.pop("mm_token_type_ids")
    with torch.no_grad():
        wrong = sequence_log_probs(reference, inputs, banned_ids=_banned(reference, t))[
            0, len(last.context_ids) :
        ]
    assert (wrong - torch.tensor(sample.log_probs)).abs().max().item() > 100 * max(worst, 1e-5)


@pytest.mark.slow
def test_vllm_stops_on_the_turn_tag(vllm_engine, hf_engine):
    """Greedy decode, then declare its 3rd token the stop tag: both engines end there, the tag included."""
    t = vllm_engine.tokens
    lr = _image(16, 16, 20)
    free = vllm_engine.generate([TextRequest(t.prompt_ids(lr), [lr], [t.stop_ids["rough"]])], GREEDY)[0][0]
    stop = free.token_ids[2]
    if stop in free.token_ids[:2]:
        pytest.skip("greedy prefix repeats the chosen stop token")
    req = TextRequest(t.prompt_ids(lr), [lr], [stop], n=1)
    for engine in (vllm_engine, hf_engine):
        got = engine.generate([req], GREEDY)[0][0]
        assert got.token_ids == free.token_ids[:3] and got.finish_reason == "stop"


@pytest.mark.slow
def test_weight_update_in_place(vllm_engine, hf_engine, reference, policy_dir):
    """After load_weights with perturbed weights (in-memory HF names), vLLM greedy == HF greedy, both differ
    from before; restoring from the checkpoint file (on-disk names) brings the old output back."""
    t = vllm_engine.tokens
    lr, rough = _image(16, 16, 30), _image(16, 16, 31)
    ctx = t.prompt_ids(lr) + t.tokenizer.encode(
        "<degradation>no blur</degradation>", add_special_tokens=False
    )
    ctx += t.image_section_ids("rough", rough)
    req = TextRequest(ctx, [lr, rough], [t.stop_ids["middle"]], max_tokens=8)

    def greedy(engine) -> TextSample:
        return engine.generate([req], GREEDY)[0][0]

    before_v, before_h = greedy(vllm_engine), greedy(hf_engine)
    assert before_v.token_ids == before_h.token_ids
    original = {k: v.detach().clone() for k, v in reference.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    perturbed = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    try:
        vllm_engine.load_weights(iter(perturbed.items()), version=1)
        hf_engine.load_weights(perturbed.items(), version=1)
        assert vllm_engine.version == hf_engine.version == 1
        after_v, after_h = greedy(vllm_engine), greedy(hf_engine)
        assert after_v.token_ids == after_h.token_ids
        assert after_v.token_ids != before_v.token_ids
        assert np.allclose(after_v.log_probs, after_h.log_probs, atol=1e-3)
    finally:
        on_disk = load_file(policy_dir / "model.safetensors")  # model.layers.*, visual.* names
        assert "model.layers.0.mlp.up_proj.weight" in on_disk and "visual.merger.mlp.0.weight" in on_disk
        vllm_engine.load_weights(iter(on_disk.items()), version=2)
        hf_engine.load_weights(on_disk.items(), version=2)
    assert greedy(vllm_engine).token_ids == greedy(hf_engine).token_ids == before_v.token_ids
    with pytest.raises(KeyError, match="not a parameter"):
        hf_engine.load_weights([("model.nope.weight", torch.zeros(1))], version=3)
