"""The tiny policy at Qwen2.5-VL-7B's vocabulary layout (``models.tiny.QWEN2_5_VL_7B_VOCAB``): a tokenizer of
exactly 151,665 ids (151,643 BPE + 22 added, as Qwen2.5's) and 152,064 embedding / lm_head rows, so 399 padded
rows, at tiny widths. Other tests can build it the same way:
``build_tiny_policy(TinyPolicyConfig(**QWEN2_5_VL_7B_VOCAB), out_dir)`` (about 5 s on CPU, 0.17 GB on disk).
"""

from pathlib import Path

import pytest
from safetensors import safe_open

from core.chain import DEGRADATION_ITEMS, LEVELS, TURNS, degradation_text, image_section
from core.config import ConfigError, TinyPolicyConfig, load_config
from models.chain_tokens import VISION_BLOCK, VISION_TOKENS, ChainTokens
from models.tiny import QWEN2_5_VL_7B_VOCAB, build_tiny_policy
from models.tokenizer import CHAIN_TAG_TOKENS, QWEN_SPECIAL_TOKENS, build_chain_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QWEN_TOKENS, QWEN_ROWS = 151_665, 152_064
ADDED = QWEN_SPECIAL_TOKENS + CHAIN_TAG_TOKENS


@pytest.fixture(scope="module")
def layout_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vocab") / "policy"
    return build_tiny_policy(TinyPolicyConfig(**QWEN2_5_VL_7B_VOCAB), out)


@pytest.fixture(scope="module")
def tokens(layout_dir) -> ChainTokens:
    return ChainTokens.from_pretrained(layout_dir)


@pytest.fixture(scope="module")
def small():
    return build_chain_tokenizer(1024)


def test_constants():
    assert QWEN2_5_VL_7B_VOCAB == {"vocab_size": QWEN_TOKENS, "embedding_rows": QWEN_ROWS}
    assert len(ADDED) == 22 and QWEN_TOKENS - len(ADDED) == 151_643


def test_sizes(layout_dir, tokens):
    import json

    assert len(tokens.tokenizer) == QWEN_TOKENS
    assert tokens.tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 151_643
    cfg = json.loads((layout_dir / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == QWEN_ROWS
    hidden = cfg["text_config"]["hidden_size"]
    with safe_open(str(layout_dir / "model.safetensors"), "pt") as f:
        names = [k for k in f.keys() if "embed_tokens" in k or "lm_head" in k]
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    assert len(shapes) == 2 and set(shapes.values()) == {(QWEN_ROWS, hidden)}, shapes


def test_added_tokens_single_and_same_offsets(layout_dir, tokens, small):
    import json

    tok = tokens.tokenizer
    big_base, small_base = QWEN_TOKENS - len(ADDED), len(small) - len(ADDED)
    for t in ADDED:
        (big_id,) = tok.encode(t, add_special_tokens=False)
        (small_id,) = small.encode(t, add_special_tokens=False)
        assert big_id == tok.convert_tokens_to_ids(t)
        assert big_id - big_base == small_id - small_base, t  # same order, right after the BPE ids
    cfg = json.loads((layout_dir / "config.json").read_text())
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["text_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>") == tokens.eos_id
    assert set(tokens.stop_ids.values()) <= {tok.convert_tokens_to_ids(t) for t in CHAIN_TAG_TOKENS}


def test_chain_text_round_trips(tokens, small):
    tok = tokens.tokenizer
    turn = TURNS[0]
    levels = {item: LEVELS[i % len(LEVELS)] for i, item in enumerate(DEGRADATION_ITEMS)}
    text = (
        f"<degradation>{degradation_text(levels)}</degradation>{turn.stop.replace('/', '')}"
        f"This image shows a cat with whiskers, héllo 日本 \t\n{turn.stop}"
    )
    for t in (text, image_section(turn.stage, "x"), "a rare Ünïcode ✓ string ~~ 0123456789"):
        ids = tok.encode(t, add_special_tokens=False)
        assert tok.decode(ids) == t
        assert len(ids) <= len(small.encode(t, add_special_tokens=False))  # trained merges apply first
    assert all(i < QWEN_TOKENS for i in ids)
    section = tokens.image_section_ids(turn.stage, (32, 32))
    assert section.count(tokens.image_pad_id) == tokens.num_image_tokens((32, 32))
    assert tok.decode(tokens.compact_image_pads(section)) == image_section(turn.stage, VISION_BLOCK)
    prompt = tokens.prompt_ids((32, 32))
    assert prompt[-1] != tokens.image_pad_id and tokens.image_pad_id in prompt


def test_banned_ids(tokens):
    banned = tokens.banned_ids(QWEN_ROWS)
    vision = sorted(tokens.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    assert banned == vision + list(range(QWEN_TOKENS, QWEN_ROWS))
    assert len(banned) == 399 + len(VISION_TOKENS) < 1024


def test_embedding_rows_exact_small(tmp_path):
    out = build_tiny_policy(TinyPolicyConfig(vocab_size=1024, embedding_rows=1030), tmp_path / "p")
    tok = ChainTokens.from_pretrained(out).tokenizer
    assert len(tok) == 1024  # exact even where the corpus trains fewer (765 ids without embedding_rows)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        rows = {f.get_slice(k).get_shape()[0] for k in f.keys() if "embed_tokens" in k or "lm_head" in k}
    assert rows == {1030}


def test_embedding_rows_smaller_than_tokenizer_raises(tmp_path):
    with pytest.raises(ValueError, match=r"policy\.tiny\.embedding_rows = 2000 .*2048"):
        build_tiny_policy(TinyPolicyConfig(vocab_size=2048, embedding_rows=2000), tmp_path / "p")
    assert not (tmp_path / "p").exists()
    with pytest.raises(ConfigError, match=r"policy\.tiny\.embedding_rows.*2000.*2048"):
        load_config(ROOT / "configs/grpo_random_local.yaml",
                    ["policy.tiny.vocab_size=2048", "policy.tiny.embedding_rows=2000"])
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", ["policy.tiny.embedding_rows=152064"])
    assert cfg.policy.tiny.embedding_rows == QWEN_ROWS


def test_exact_tokenizer_sizes():
    assert len(build_chain_tokenizer(1024)) == 765  # the default: what the corpus trains, unchanged
    assert len(build_chain_tokenizer(1024, exact=True)) == 1024
    with pytest.raises(ValueError, match="vocab_size must be >= 278"):
        build_chain_tokenizer(100, exact=True)


def test_the_gpu_runner_limits_are_vllms_and_a_design_beyond_them_is_named():
    from vllm import SamplingParams

    from actors.vllm_engine import check_gpu_runner_limits, gpu_runner_limits

    assert gpu_runner_limits() == {"allowed_token_ids": 1024, "logit_bias": 1024, "stop_token_ids": 128}
    check_gpu_runner_limits(SamplingParams(logit_bias={i: float("-inf") for i in range(404)}))
    # the design the engine used before: every id but the banned ones, ~151,660 at the 7B layout
    with pytest.raises(ValueError, match=r"Model Runner V2.*allowed_token_ids: 2000 > 1024"):
        check_gpu_runner_limits(SamplingParams(allowed_token_ids=list(range(2000))))
    with pytest.raises(ValueError, match=r"logit_bias: 1025 > 1024"):
        check_gpu_runner_limits(SamplingParams(logit_bias={i: -1.0 for i in range(1025)}))
    with pytest.raises(ValueError, match=r"stop_token_ids: 200 > 128"):
        check_gpu_runner_limits(SamplingParams(stop_token_ids=list(range(200))))


@pytest.mark.slow
def test_vllm_samples_and_the_learner_rescores_at_the_7b_vocabulary_layout(layout_dir, tokens):
    """The engine at Qwen2.5-VL-7B's layout: its bans (404 ids: 5 vision tokens + 399 padded rows, as logit
    biases) pass the GPU runner's limits at start-up, it never samples one, and the learner's teacher-forced
    forward with the same ids masked reproduces its sampling log-probs over two turns with images."""
    import numpy as np
    import torch

    from actors.text_engine import TextEngineSpec, TextRequest
    from actors.vllm_engine import VLLMTextEngine
    from core.config import SamplingConfig
    from models.chain_tokens import sequence_log_probs
    from models.policy import load_policy

    engine = VLLMTextEngine(TextEngineSpec(layout_dir, SamplingConfig(temperature=1.0, seed=0), 6))
    try:
        banned = set(engine.banned_ids)
        assert len(banned) == 404 and tokens.image_pad_id in banned and set(engine._ban) == banned
        assert banned == set(tokens.banned_ids(QWEN_ROWS))  # what the learner masks
        model = load_policy(layout_dir)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # sharp weights (the bootstrap's are near-uniform over 152k ids, which any
            for p in model.parameters():  # position or mask error would barely move), through the weight update
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
        engine.load_weights(model.state_dict().items(), version=1)
        rng = np.random.default_rng(0)
        lr, rough = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((16, 16, 3), (16, 24, 3)))
        request = TextRequest(tokens.prompt_ids(lr), [lr], [tokens.stop_ids["rough"]], n=3)
        for turn in range(2):
            samples = engine.generate([request])[0]
            contexts = [list(request.context_ids) + list(s.token_ids) for s in samples]
            with torch.no_grad():
                lp = sequence_log_probs(model, tokens.batch_inputs(contexts, [request.images] * 3),
                                        banned_ids=sorted(banned))
            P = len(request.context_ids)
            # sharp: sampled tokens far from uniform's -log(151,660) = -11.9, so a mask or position error shows
            assert max(lp[i, P:P + len(s.token_ids)].max() for i, s in enumerate(samples)) > -9
            for i, s in enumerate(samples):
                assert not set(s.token_ids) & banned
                assert (lp[i, P:P + len(s.token_ids)] - torch.tensor(s.log_probs)).abs().max() < 1e-3
            request = TextRequest(contexts[0] + tokens.image_section_ids("rough", rough), [lr, rough],
                                  [tokens.stop_ids["middle"]], n=3)
    finally:
        engine.close()


def test_grpo_8node_passes_every_start_up_check(tokens):
    """The cluster config loads (its validation), its placement fits the RayCluster, its tensor parallelism fits its
    GPUs, and the sampling parameters its engines send at Qwen2.5-VL-7B's layout are inside the GPU runner's
    limits: the checks a run makes before its first step."""
    from actors.text_engine import EOS_TOKENS, TextRequest
    from actors.vllm_engine import check_gpu_runner_limits, sampling_params
    from core.placement import fits, placement_requests, rollout_layout, worker_groups_from_manifest

    cfg = load_config(ROOT / "configs/grpo_8node.yaml")
    assert fits(placement_requests(cfg), worker_groups_from_manifest(ROOT / "cluster/raycluster.yaml"),
                cfg.ray.placement_strategy) == []
    assert len(rollout_layout(cfg.rollout).actors) == cfg.rollout.num_actors
    ban = {i: float("-inf") for i in tokens.banned_ids(QWEN_ROWS)}
    eos = {tokens.tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}
    every_stop = sorted(set(tokens.stop_ids.values()))
    params = sampling_params(TextRequest([0], [], every_stop, n=cfg.grpo.group_size), cfg.rollout.sampling, 0,
                             cfg.chain.max_stage_tokens, eos, ban)
    check_gpu_runner_limits(params)
    assert len(params.logit_bias) == 404 and not params.allowed_token_ids
