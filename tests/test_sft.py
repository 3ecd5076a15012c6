"""Cold-start SFT: synthesised target chains (well-formed, labels recoverable, rollout token layout, stage
images at the paper's gt_4 / gt_2 / gt sizes), init_from, and supervised steps of an in-process world-size-1
DeepSpeed learner (its loss is the plain teacher-forced cross-entropy, and it goes down)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.chain import STAGES, TURNS, parse_chain, parse_degradation_text, render_turn
from core.config import DataConfig, load_config
from core.records import DegradationLabels, Sample
from data.photos import PHOTOS_BY_NAME
from data.sft_targets import SFTRecord, build_record, to_rollout, understanding_from_tags, understanding_texts
from rewards.format import format_reward

ROOT = Path(__file__).resolve().parents[1]
SCALES = {"rough": 1, "middle": 2, "final": 4}


@pytest.fixture(scope="module")
def models(small_models) -> dict[str, Path]:
    return small_models


@pytest.fixture(scope="module")
def tokens(models):
    from models.chain_tokens import ChainTokens

    return ChainTokens.from_pretrained(models["policy"])


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    from data.dataset import PairDataset

    return PairDataset(DataConfig(hr_size=64, scale=4), "train").batch(0, 4)


# ============================================================================================ target synthesis
def test_target_chain_is_well_formed_and_states_the_labels(samples, tokens):
    for s in samples:
        rec = build_record(s, tokens, SCALES)
        parsed = parse_chain(rec.text)
        assert parsed.well_formed, parsed.problems
        assert format_reward(rec.text) == 1.0
        assert parse_degradation_text(parsed.degradation) == s.degradation.levels  # parses back to the labels
        captions = PHOTOS_BY_NAME[s.image_id].captions
        assert [parsed.understanding(st) for st in STAGES] == [captions[st] for st in STAGES]
        # the policy-written tokens alone decode to the three turns, each ending on its stop tag
        written = rec.token_ids[rec.target_mask.bool()].tolist()
        turns = "".join(render_turn(t, parsed.degradation, captions) for t in TURNS)
        assert tokens.decode(written) == turns
        assert sum(t == tokens.stop_ids[st] for t in written for st in STAGES) == 3
        assert written[-1] == tokens.stop_ids["final"]


def test_layout_matches_the_rollout_and_the_mask_covers_only_target_text(samples, tokens):
    s = samples[0]
    rec = build_record(s, tokens, SCALES)
    assert rec.prompt_ids.tolist() == tokens.prompt_ids(s.lr)
    tok = tokens.tokenizer
    und = understanding_texts(s.image_id, s.tags)
    deg = parse_chain(rec.text).degradation
    enc = [tok.encode(render_turn(t, deg, und), add_special_tokens=False) for t in TURNS]
    rough, middle = rec.context_images[1], rec.context_images[2]
    want = (enc[0] + tokens.image_section_ids("rough", rough) + enc[1]
            + tokens.image_section_ids("middle", middle) + enc[2])
    assert rec.token_ids.tolist() == want  # ChainSampler's order: turn, inserted image section, turn, ...
    mask = rec.target_mask.tolist()
    sections = [tokens.image_section_ids(st, im) for st, im in (("rough", rough), ("middle", middle))]
    assert mask == [1] * len(enc[0]) + [0] * len(sections[0]) + [1] * len(enc[1]) + [0] * len(sections[1]) \
        + [1] * len(enc[2])
    vision = {tokens.image_pad_id, tokens.vision_start_id, tokens.vision_end_id}
    assert not any(t in vision for t, m in zip(want, mask) if m)  # no image token carries a loss
    tokens.check_context(rec.prompt_ids.tolist() + rec.token_ids.tolist(), rec.context_images)
    rollout = to_rollout(rec)
    assert torch.equal(rollout.text_mask, rec.target_mask) and rollout.traces == ()
    assert int(to_rollout(rec.zero_weight()).text_mask.sum()) == 0


def test_stage_images_are_the_hr_at_quarter_half_and_full_size(samples, tokens):
    s = samples[1]
    rec = build_record(s, tokens, SCALES)
    lr, hr = s.lr, s.hr
    sizes = {st.stage: st.target.shape[:2] for st in rec.stages}
    assert sizes == {"rough": lr.shape[:2], "middle": (hr.shape[0] // 2, hr.shape[1] // 2), "final": hr.shape[:2]}
    assert hr.shape[0] == 4 * lr.shape[0]
    by = {st.stage: st for st in rec.stages}
    assert np.array_equal(by["final"].target, hr)
    assert np.array_equal(by["rough"].condition, lr)  # conditions: LR, gt_rough, gt_middle
    assert np.array_equal(by["middle"].condition, by["rough"].target)
    assert np.array_equal(by["final"].condition, by["middle"].target)
    assert [im.shape for im in rec.context_images] == [lr.shape, by["rough"].target.shape,
                                                       by["middle"].target.shape]
    # a box-downsampled HR: the 2x2 mean of the HR, not the (degraded) LR
    quarter = hr.reshape(lr.shape[0], 4, lr.shape[1], 4, 3).mean(axis=(1, 3))
    assert np.abs(by["rough"].target.astype(float) - quarter).max() <= 1.0
    assert [st.text for st in rec.stages] == [PHOTOS_BY_NAME[s.image_id].captions[st] for st in STAGES]


def test_texts_from_tags_grow_in_detail_and_bad_samples_are_named(samples, tokens):
    texts = understanding_from_tags(("lion", "rock", "sky"))
    assert texts["rough"] == "This image shows lion, rock and sky."
    assert texts["middle"].startswith(texts["rough"]) and texts["final"].startswith(texts["middle"])
    assert len(texts["rough"]) < len(texts["middle"]) < len(texts["final"])
    # a non-skimage source with a photo's name still uses its tags, not the photo's captions
    assert understanding_texts("astronaut", ("dog",), photo_captions=False)["rough"] == "This image shows dog."
    rec = build_record(samples[0], tokens, SCALES, photo_captions=False)
    assert format_reward(rec.text) == 1.0 and "This image shows" in rec.text
    real = Sample(7, "x", samples[0].lr, samples[0].hr, (), None)
    with pytest.raises(ValueError, match="prompt_id=7.*no degradation labels"):
        build_record(real, tokens, SCALES)
    labels = DegradationLabels({"blur": "heavy"}, {})
    with pytest.raises(ValueError, match="no HR image"):
        build_record(Sample(8, "x", samples[0].lr, None, (), labels), tokens, SCALES)


def test_target_synthesis_and_run_state_import_without_ray():
    import subprocess
    import sys

    code = "import sys, data.sft_targets, rl.run_state; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# ============================================================================================ init_from
def test_init_from_copies_once_and_points_both_paths_at_the_copy(tmp_path, models):
    from models.bootstrap import ModelMissingError, apply_init_from, ensure_models

    cfg = load_config(ROOT / "configs/sft_local.yaml", [
        f"output_dir={tmp_path / 'run'}", f"policy.init_from={models['policy']}",
        f"diffusion.init_from={models['diffusion']}", "policy.bootstrap=false", "diffusion.bootstrap=false"])
    ensure_models(cfg)
    assert cfg.policy.path == str(tmp_path / "run/init/policy")
    assert cfg.diffusion.path == str(tmp_path / "run/init/diffusion")
    assert (Path(cfg.policy.path) / "config.json").read_bytes() == (models["policy"] / "config.json").read_bytes()
    assert (Path(cfg.diffusion.path) / "model_index.json").is_file()
    stamp = Path(cfg.policy.path) / "config.json"
    before = stamp.stat().st_mtime_ns
    apply_init_from(cfg)  # a second start (e.g. resume) reuses the copy
    assert stamp.stat().st_mtime_ns == before
    cfg.policy.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ModelMissingError, match=r"policy.init_from = '.*nowhere'.*config.json"):
        apply_init_from(cfg)


# ============================================================================================ the learner
def _solo(models, port: int, *overrides: str):
    from learner.worker import LearnerWorker

    cfg = load_config(ROOT / "configs/sft_local.yaml", [
        f"policy.path={models['policy']}", f"diffusion.path={models['diffusion']}", "learner.num_ranks=1",
        "learner.micro_batch_size=1", "sft.batch_size=2", "learner.num_cpus=1",
        "learner.policy_optim.warmup_steps=0", "learner.diffusion_optim.warmup_steps=0",
        "learner.diffusion_optim.lr=2e-3", *overrides])
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return LearnerWorker.from_config(cfg, env)


@pytest.fixture(scope="module")
def worker(models, port):
    return _solo(models, port)


@pytest.fixture(scope="module")
def records(samples, tokens) -> list[SFTRecord]:
    return [build_record(s, tokens, SCALES) for s in samples[:2]]


def _target_nll(records, tokens, policy_dir) -> tuple[float, int]:
    """The summed NLL of the records' target tokens under the policy saved at ``policy_dir``, and their
    count."""
    from models.chain_tokens import sequence_log_probs
    from models.policy import load_policy

    with torch.no_grad():
        model = load_policy(policy_dir)
        nll, count = 0.0, 0
        for r in records:
            inputs = tokens.batch_inputs([r.prompt_ids.tolist() + r.token_ids.tolist()], [r.context_images])
            logp = sequence_log_probs(model, inputs, banned_ids=tokens.banned_ids(model.config.text_config.vocab_size))
            target = logp[0, len(r.prompt_ids):][r.target_mask.bool()]
            nll, count = nll - float(target.sum()), count + int(target.numel())
    return nll, count


@pytest.mark.slow
def test_sft_steps_compute_the_plain_cross_entropy_and_lower_the_loss(worker, records, tokens, models):
    nll, count = _target_nll(records, tokens, models["policy"])  # by hand, before any update
    first = worker.sft_step(*records)  # micro_batch_size 1: two micro-batches, normalised by the global count
    assert first["tokens"] == count and first["records"] == 2 and first["images"] == 6
    assert first["text_loss"] == pytest.approx(nll / count, rel=1e-4)
    assert 0 <= first["token_accuracy"] <= 1
    assert first["image_loss"] > 0 and first["policy_grad_norm"] > 0 and first["diffusion_grad_norm"] > 0
    metrics = [worker.sft_step(*records) for _ in range(4)]
    assert metrics[-1]["text_loss"] < 0.9 * first["text_loss"]
    assert metrics[-1]["optimizer_steps"] == first["optimizer_steps"] + 4
    # the image loss is an MSE at random timesteps: compare the mean of later steps with the first
    assert np.mean([m["image_loss"] for m in metrics[-2:]]) < first["image_loss"]


@pytest.mark.slow
def test_zero_weight_copy_changes_nothing_and_mixed_weights_are_rejected(worker, records):
    before = {k: v.clone() for k, v in worker.gather_full_state("policy").items()}
    steps = worker.optimizer_steps
    m = worker.sft_step(records[0].zero_weight())
    assert m["tokens"] == 0 and m["records"] == 0 and "text_loss" not in m and "image_loss" not in m
    assert worker.optimizer_steps == steps
    after = worker.gather_full_state("policy")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="weights must be all 1.0"):
        worker.sft_step(records[0], records[1].zero_weight())


@pytest.mark.slow
def test_a_frozen_policy_is_skipped(models, records, port):
    frozen = _solo(models, port, "policy.freeze=true")
    assert frozen.info()["trained"] == ["diffusion"]
    m = frozen.sft_step(*records)
    assert "text_loss" not in m and "policy_grad_norm" not in m and "token_accuracy" not in m
    assert m["image_loss"] > 0 and m["diffusion_grad_norm"] > 0 and m["optimizer_steps"] == 1
