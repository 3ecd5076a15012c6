"""The DeepSpeed learner: one ZeRO group of Ray actors, log-prob re-scoring, gathers, exports, checkpoints.

Tiny random models (Qwen2.5-VL policy, SR diffusion pipeline) and four real chains sampled from them: each
chain's old log-probs come from a plain HF forward (text) and the sampler itself (images), so on the first
update epoch the learner's re-scored ratio must be exactly 1. Workers built in-process (world size 1) cover
ZeRO-3 and ZeRO-0; a 2-rank ZeRO-2 LearnerGroup of Ray actors covers the distributed path, and must compute
the same losses and gradient norms as one rank holding the whole batch.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from learner_support import ADVANTAGES, learner_config, one_rank_worker, sample_rollouts, solo_worker

from core import grpo
from core.records import ChainAdvantage, Rollout
from learner.batching import contiguous_sizes, masked_copy, micro_batches, reduce_sums

TIMINGS: dict[str, float] = {}  # printed at the end of the module (pytest -s) for the report


# ============================================================================================ pure parts
def _lr_multipliers(optim: str, total: int, steps, **kw) -> list[float]:
    from core.config import OptimConfig
    from learner.engine import lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = lr_scheduler(opt, OptimConfig(lr=0.5, schedule=optim, **kw), total)
    return [scheduler.lr_lambdas[0](s) for s in steps]


def test_lr_schedules():
    """transformers' schedules behind learner.*_optim: warmup from 0, then constant / cosine / linear to
    min_lr_ratio."""
    assert _lr_multipliers("constant", 10, (0, 5, 10)) == [1.0, 1.0, 1.0]
    assert _lr_multipliers("constant", 10, (0, 1, 3, 4), warmup_steps=4) == [0.0, 0.25, 0.75, 1.0]
    assert _lr_multipliers("cosine", 10, (0, 5, 10), min_lr_ratio=0.1) == pytest.approx([1.0, 0.55, 0.1])
    assert _lr_multipliers("linear", 12, (1, 2, 7, 12), warmup_steps=2, min_lr_ratio=0.0) \
        == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert _lr_multipliers("linear", 12, (2, 7, 12), warmup_steps=2, min_lr_ratio=0.5) \
        == pytest.approx([1.0, 0.75, 0.5])


def _toy_batch(n: int) -> tuple[grpo.TrainBatch, list[Rollout]]:
    rollouts = []
    for i in range(n):
        t = 2 + i
        rollouts.append(
            Rollout(
                prompt_id=i // 2,
                sample_index=i % 2,
                policy_version=0,
                diffusion_version=0,
                prompt_ids=torch.arange(3),
                token_ids=torch.arange(t),
                text_mask=torch.ones(t, dtype=torch.long),
                log_probs=-torch.ones(t),
                text="",
                images={},
                context_images=[],
                traces=(),
            )
        )
    return grpo.build_train_batch(rollouts, torch.arange(n, dtype=torch.float32)), rollouts


def test_micro_batches_split_in_order_and_pad_to_the_longest_ranks_count():
    batch, rollouts = _toy_batch(5)
    one_rank = lambda values, op="sum": [float(v) for v in values]  # noqa: E731
    micro = micro_batches(batch, rollouts, 2, one_rank)
    assert [len(m.batch) for m in micro] == [2, 2, 1] and all(m.real for m in micro)
    assert [(r.prompt_id, r.sample_index) for m in micro for r in m.rollouts] == list(batch.keys)
    for m in micro:  # each row is paired with its own rollout
        assert list(m.batch.keys) == [(r.prompt_id, r.sample_index) for r in m.rollouts]
    longest_rank_has_5 = lambda values, op="sum": [5.0 if op == "max" else float(v) for v in values]  # noqa: E731
    padded = micro_batches(batch, rollouts, 2, longest_rank_has_5)
    assert len(padded) == 5 and [m.real for m in padded] == [True] * 3 + [False] * 2
    assert [m.batch.num_tokens for m in padded[3:]] == [0, 0]  # copies carry no loss
    assert float(masked_copy(batch).advantages.abs().sum()) == 0.0
    assert contiguous_sizes(5, 2) == [3, 2] and contiguous_sizes(1, 3) == [1, 0, 0]
    assert reduce_sums({"b": 2.0, "a": 1.0}, lambda values, op="sum": [2 * v for v in values]) == {"a": 2.0, "b": 4.0}


# ======================================================================================= tiny models + chains
def _dir_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def models(small_models) -> dict[str, Path]:
    return small_models


@pytest.fixture(scope="module")
def chains(models) -> tuple[grpo.TrainBatch, list[Rollout]]:
    t = time.perf_counter()
    rollouts = sample_rollouts(models["policy"], models["diffusion"])
    TIMINGS["sample 4 chains"] = time.perf_counter() - t
    order = [1, 0, 3, 2]  # build_train_batch's rows index the given list: exercise a non-identity mapping
    given = [rollouts[i] for i in order]
    batch = grpo.build_train_batch(given, ADVANTAGES[order])
    return batch, given


# ========================================================================================= in-process, ZeRO-3
@pytest.fixture(scope="module")
def zero3(models, chains, port, tmp_path_factory) -> dict:
    """One rank holding the whole batch under ZeRO-3: state before/after one step, and a checkpoint of it."""
    batch, rollouts = chains
    cfg = learner_config(models, "learner.num_ranks=1", "learner.zero_stage=3", "learner.micro_batch_size=2")
    t = time.perf_counter()
    worker = solo_worker(cfg, port)
    TIMINGS["in-process ZeRO-3 worker start"] = time.perf_counter() - t
    before = {m: worker.gather_full_state(m) for m in ("policy", "diffusion")}
    t = time.perf_counter()
    metrics = worker.train_step(batch, *rollouts)
    TIMINGS["in-process ZeRO-3 train step (4 chains)"] = time.perf_counter() - t
    after = {m: worker.gather_full_state(m) for m in ("policy", "diffusion")}
    ckpt = tmp_path_factory.mktemp("zero3_ckpt")
    worker.save_checkpoint(str(ckpt))
    return {"worker": worker, "cfg": cfg, "before": before, "after": after, "metrics": metrics, "ckpt": ckpt}


@pytest.mark.slow
def test_first_epoch_rescoring_reproduces_the_rollout_log_probs(zero3, chains):
    batch, _ = chains
    m = zero3["metrics"]
    # Ratio exactly 1 (to float noise) means the learner re-scored the exact sampled tokens with the same
    # images at the same positions, and the same denoising transitions.
    for kind in ("text", "image"):
        assert m[f"{kind}_first_epoch_ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # the on-policy check
        assert m[f"{kind}_ratio_min"] == pytest.approx(1.0, abs=1e-4)
        assert m[f"{kind}_ratio_max"] == pytest.approx(1.0, abs=1e-4)
        assert m[f"{kind}_clip_fraction"] == 0.0
    # the text ratio is taken against the learner's own first epoch (grpo.engine_correction: tis), so the check
    # that the learner reproduces the rollout's log-probs is the engine gap, measured on every on-policy token
    assert m["engine_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and m["engine_logp_gap"] < 1e-4
    assert m["engine_clip_fraction"] == 0.0 and m["tis_text_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["tokens"] == batch.num_tokens and m["diffusion_steps"] == batch.num_steps and m["chains"] == 4
    # at ratio 1 the surrogate is -mean(A) over tokens: the advantages of the chains weighted by their tokens
    per_chain = batch.loss_mask.sum(1).float()
    assert m["text_loss"] == pytest.approx(
        float(-(batch.step_advantages[:, 0] * per_chain).sum() / per_chain.sum()), abs=1e-5
    )
    assert m["policy_grad_norm"] > 0 and m["diffusion_grad_norm"] > 0
    assert m["policy_lr"] == pytest.approx(zero3["cfg"].learner.policy_optim.lr)


@pytest.mark.slow
def test_zero3_step_changes_weights_and_gather_returns_full_shapes(zero3, models):
    from transformers import Qwen2_5_VLForConditionalGeneration

    before, after = zero3["before"], zero3["after"]
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(models["policy"])).state_dict()
    assert set(after["policy"]) == set(reference)
    for name, tensor in reference.items():
        assert after["policy"][name].shape == tensor.shape, name  # gathered, not the rank's shard
        assert torch.equal(before["policy"][name], tensor), name  # the learner started from the saved weights
    assert any(not torch.equal(before["policy"][k], after["policy"][k]) for k in reference)
    assert any(not torch.equal(before["diffusion"][k], after["diffusion"][k]) for k in after["diffusion"])
    assert any(k.startswith("text_encoder.") for k in after["diffusion"])  # both diffusion parts are trained
    assert zero3["worker"].info()["parameters"]["policy"] == sum(t.numel() for t in reference.values())


@pytest.fixture(scope="module")
def zero3_export(zero3, tmp_path_factory) -> dict:
    """The ZeRO-3 worker's HF export after its one step (``zero3["after"]``): the folder and what it wrote. A
    fixture, so that the test that steps the worker again can have it done first."""
    out = tmp_path_factory.mktemp("zero3_export")
    t = time.perf_counter()
    written = zero3["worker"].export_hf(str(out))
    TIMINGS["in-process ZeRO-3 export_hf"] = time.perf_counter() - t
    return {"dir": out, "written": written}


@pytest.mark.slow
def test_export_round_trip_equals_the_gathered_weights(zero3, zero3_export):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from models.sr_pipeline import SRPipeline

    out, written = zero3_export["dir"], zero3_export["written"]
    assert written == {"policy": str(out / "policy"), "diffusion": str(out / "diffusion")}
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(written["policy"]).state_dict()
    gathered = zero3["after"]["policy"]
    assert set(policy) == set(gathered)
    assert all(torch.equal(policy[k], gathered[k]) for k in gathered)
    assert AutoProcessor.from_pretrained(written["policy"]).image_processor.merge_size == 2  # processor saved
    pipe = SRPipeline.from_pretrained(written["diffusion"])
    exported = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    exported.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    assert all(torch.equal(exported[k], v) for k, v in zero3["after"]["diffusion"].items())


@pytest.mark.slow
def test_checkpoint_restores_weights_and_optimizer_in_a_fresh_worker(zero3, zero3_export, chains, port):
    """Steps the ZeRO-3 worker a second time: it requests ``zero3_export`` so that the export of the first
    step is written before, whatever order the tests run in (no other test steps that worker)."""
    batch, rollouts = chains
    original = zero3["worker"]
    second = original.train_step(batch, *rollouts)  # step 2 from the checkpointed state
    want = original.gather_full_state("policy")
    fresh = solo_worker(zero3["cfg"], port)
    t = time.perf_counter()
    fresh.load_checkpoint(str(zero3["ckpt"]))
    TIMINGS["in-process ZeRO-3 load_checkpoint"] = time.perf_counter() - t
    restored = fresh.gather_full_state("policy")
    assert all(torch.equal(restored[k], v) for k, v in zero3["after"]["policy"].items())
    again = fresh.train_step(batch, *rollouts)
    got = fresh.gather_full_state("policy")
    # Adam's second step depends on the first step's moments: equal weights mean they were restored too.
    assert all(torch.allclose(got[k], v, atol=1e-7, rtol=0) for k, v in want.items())
    assert again["text_loss"] == pytest.approx(second["text_loss"], abs=1e-6)
    assert fresh.optimizer_steps == original.optimizer_steps == 2


@pytest.mark.slow
def test_bad_inputs_are_clear_errors(zero3, chains, tmp_path):
    batch, rollouts = chains
    worker = zero3["worker"]
    with pytest.raises(ValueError, match="paired with rollout"):
        worker.train_step(batch, *reversed(rollouts))
    with pytest.raises(ValueError, match="model must be one of"):
        worker.gather_full_state("vae")
    with pytest.raises(FileNotFoundError, match="not a learner checkpoint"):
        worker.load_checkpoint(str(tmp_path))
    broken = replace(rollouts[0], context_images=rollouts[0].context_images[:2])
    with pytest.raises(ValueError, match="sample_index=.*image-pad runs"):
        worker.train_step(batch.select([0]), broken)


# ================================================================= in-process: ZeRO-0 and ZeRO-1, policy only
@pytest.mark.slow
def test_frozen_diffusion_is_not_held_trained_or_changed(models, chains, zero3, port, tmp_path):
    batch, rollouts = chains
    source = _dir_digest(models["diffusion"])
    cfg = learner_config(
        models,
        "learner.num_ranks=1",
        "learner.zero_stage=0",
        "learner.micro_batch_size=1",
        "diffusion.freeze=true",
    )
    worker = solo_worker(cfg, port)
    assert worker.info()["trained"] == ["policy"] and worker.models.sr is None
    m = worker.train_step(batch, *rollouts)
    assert "image_loss" not in m and "diffusion_grad_norm" not in m and m["diffusion_steps"] == 0
    # same weights and batch as the ZeRO-3 worker's first step: the same loss and pre-clip gradient norm
    # (ZeRO-0 reports it through our optimizer hook, ZeRO-3 through DeepSpeed)
    assert m["text_loss"] == pytest.approx(zero3["metrics"]["text_loss"], abs=1e-6)
    assert m["policy_grad_norm"] == pytest.approx(zero3["metrics"]["policy_grad_norm"], rel=1e-4)
    with pytest.raises(ValueError, match="diffusion is frozen"):
        worker.gather_full_state("diffusion")
    written = worker.export_hf(str(tmp_path))
    assert _dir_digest(Path(written["diffusion"])) == source == _dir_digest(models["diffusion"])


@pytest.mark.slow
def test_kl_to_reference_update_epochs_and_lr_decay_zero1(models, chains, port):
    from learner.engine import current_lr

    batch, rollouts = chains
    cfg = learner_config(
        models,
        "learner.num_ranks=1",
        "learner.zero_stage=1",
        "learner.micro_batch_size=2",
        "diffusion.freeze=true",
        "grpo.kl_beta=0.5",
        "grpo.update_epochs=2",
        "learner.policy_optim.schedule=linear",
    )
    worker = solo_worker(cfg, port)
    assert worker.models.policy.reference is not None and not worker.models.policy.reference.training
    m = worker.train_step(batch, *rollouts)
    assert m["optimizer_steps"] == 2  # one optimizer step per update epoch
    # epoch 1 starts at the reference (KL 0, ratio 1); epoch 2 re-scores the same rollout after an update
    assert m["kl"] > 0
    assert m["text_ratio_max"] > 1 + 1e-6 or m["text_ratio_min"] < 1 - 1e-6
    lr, ratio = cfg.learner.policy_optim.lr, cfg.learner.policy_optim.min_lr_ratio
    assert m["policy_lr"] == pytest.approx(lr)  # the first step's
    # linear decay over total_steps x update_epochs = 8 optimizer steps: 2 done
    assert current_lr(worker.engine("policy")) == pytest.approx(lr * (1 - (1 - ratio) * 2 / 8))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adamw", 1e-4)])
def test_an_update_raises_a_positive_chains_likelihood_and_lowers_a_negative_ones(
        models, chains, port, optimizer, lr):
    # The direction of the whole path (advantage -> token loss -> DeepSpeed backward -> optimizer step): after
    # one step on a single chain with A = +1 (or -1), re-scoring that chain gives mean ratio > 1 (< 1).
    # The second step's text_loss at A = +1 on that chain alone is -sum(ratio) / tokens, so it reads the ratio.
    batch, rollouts = chains
    cfg = learner_config(models, "learner.num_ranks=1", "learner.zero_stage=2", "learner.micro_batch_size=2",
                         "diffusion.freeze=true", f"learner.policy_optim.name={optimizer}",
                         f"learner.policy_optim.lr={lr}", "learner.grad_clip=0")
    worker = solo_worker(cfg, port)
    one = (torch.arange(len(batch)) == 0).float()
    probe = grpo.build_train_batch(rollouts, one)
    mean_ratio = {}
    for sign in (1.0, -1.0):
        if sign < 0:
            worker = solo_worker(cfg, port)  # fresh weights
        worker.train_step(grpo.build_train_batch(rollouts, sign * one), *rollouts)
        m = worker.train_step(probe, *rollouts)
        mean_ratio[sign] = -m["text_loss"] * m["tokens"] / float(probe.loss_mask[0].sum())
    assert mean_ratio[1.0] > 1.0 + 1e-4, mean_ratio
    assert mean_ratio[-1.0] < 1.0 - 1e-4, mean_ratio


@pytest.mark.slow
def test_train_steps_fraction_halves_the_rescored_and_trained_steps(models, chains, port):
    """diffusion.train_steps_fraction: only the first half of each trace's denoising steps is re-scored (one UNet
    pass per step) and gets a loss; the rest are never run. With diffusion.train_steps_start 0.5, the second half."""
    _, rollouts = chains
    seen = {}
    for fraction, start in ((1.0, 0.0), (0.5, 0.0), (0.5, 0.5)):
        worker = one_rank_worker(models, port, "policy.freeze=true", f"diffusion.train_steps_fraction={fraction}",
                                 f"diffusion.train_steps_start={start}")
        calls: list[tuple[int, ...]] = []
        rescore = worker.engine("diffusion").module.sr.trace_log_probs

        def counting(traces, step_indices=None, _rescore=rescore, _calls=calls):
            _calls.extend([tuple(step_indices)] * len(traces))  # one entry per re-scored trace step
            return _rescore(traces, step_indices)

        worker.engine("diffusion").module.sr.trace_log_probs = counting
        m = worker.train_chains([ChainAdvantage(float(a)) for a in ADVANTAGES], False, *rollouts)
        seen[fraction, start] = (calls, m["diffusion_steps"])
    (full, full_steps), (half, half_steps), (late, late_steps) = seen[1.0, 0.0], seen[0.5, 0.0], seen[0.5, 0.5]
    assert set(late) == {(1,)} and late_steps == half_steps  # diffusion.train_steps_start: the low-noise half
    assert len(full) == 2 * len(half) and full_steps == 2 * half_steps  # half re-scored, half trained
    assert set(half) == {(0,)} and set(full) == {(0,), (1,)}  # one step a pass; the high-noise end kept
    assert half_steps == 4 * 2  # 4 chains x 2 traces x 1 of their 2 steps


@pytest.mark.slow
def test_a_resume_trains_at_the_configs_learning_rate_from_the_checkpoints_schedule_position(
        models, chains, port, tmp_path):
    """The moments and the step count come from the checkpoint, the rates from the config: the same config gives
    the saved rate to the bit; a config with 10x the rate (a resume that accepted the change) trains at 10x."""
    from learner.engine import current_lr

    batch, rollouts = chains
    warm = ("diffusion.freeze=true", "learner.policy_optim.warmup_steps=4")
    worker = one_rank_worker(models, port, *warm)
    worker.train_step(batch, *rollouts)
    saved_lr = current_lr(worker.engine("policy"))
    worker.save_checkpoint(str(tmp_path))
    same = one_rank_worker(models, port, *warm)
    same.load_checkpoint(str(tmp_path))
    assert current_lr(same.engine("policy")) == saved_lr and same.optimizer_steps == 1
    lr = learner_config(models).learner.policy_optim.lr
    faster = one_rank_worker(models, port, *warm, f"learner.policy_optim.lr={10 * lr}")
    faster.load_checkpoint(str(tmp_path))
    assert current_lr(faster.engine("policy")) == pytest.approx(10 * saved_lr, rel=1e-12)  # warmup step 1 of 4
    group = faster.engine("policy").lr_scheduler.optimizer.param_groups[0]
    assert group["initial_lr"] == pytest.approx(10 * lr, rel=1e-12)
    before = faster.gather_full_state("policy")
    faster.train_step(batch, *rollouts)
    assert current_lr(faster.engine("policy")) == pytest.approx(10 * lr * 2 / 4, rel=1e-12)  # step 2 of 4
    assert any(not torch.equal(v, faster.gather_full_state("policy")[k]) for k, v in before.items())


def _one_policy_step(models, chains, port, override: str):
    """A one-rank worker with ``override`` after one step: (worker, the policy's names, the names it changed)."""
    batch, rollouts = chains
    worker = one_rank_worker(models, port, "diffusion.freeze=true", override)
    before = worker.gather_full_state("policy")
    worker.train_step(batch, *rollouts)
    after = worker.gather_full_state("policy")
    return worker, list(before), {n for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.slow
def test_only_the_trainable_parameters_change(models, chains, port):
    _, names, changed = _one_policy_step(models, chains, port, "policy.trainable=[language_model.norm.weight]")
    assert changed == {n for n in names if n.endswith("language_model.norm.weight")} and len(changed) == 1


@pytest.mark.slow
def test_image_clip_range_clips_the_denoising_steps_only(models, chains, port):
    """Two update epochs, so the second epoch's ratios move: grpo.image_clip_range = 1e-4 clips the denoising
    steps far more than the text's range does, while the text's loss, clipping and gradients
    stay exactly those of the run without it (the two surrogates are separate)."""
    batch, rollouts = chains
    runs = {}
    for clip in ("null", "1e-4"):
        worker = one_rank_worker(models, port, "grpo.update_epochs=2", f"grpo.image_clip_range={clip}",
                                 "learner.policy_optim.lr=1e-2", "learner.diffusion_optim.lr=1e-5")
        runs[clip] = worker.train_step(batch, *rollouts)
    wide, narrow = runs["null"], runs["1e-4"]
    for key in ("text_loss", "text_clip_fraction", "text_ratio_max", "policy_grad_norm"):
        assert narrow[key] == pytest.approx(wide[key], rel=1e-6, abs=1e-9), key
    # the epoch-2 ratios are the same in both runs (epoch 1 is on-policy and unclipped in both); the narrow range
    # clips many more of them (a step's ratio moves fast: at this lr some fall to 0.75 after one update)
    assert narrow["image_ratio_min"] == wide["image_ratio_min"] < 0.99
    assert narrow["image_clip_fraction"] >= max(0.1, 3 * wide["image_clip_fraction"]), (narrow, wide)
    assert narrow["image_clip_fraction"] <= 0.5  # the first epoch is on-policy: ratio 1, never clipped
    assert narrow["image_first_epoch_ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # the on-policy check ...
    assert narrow["image_ratio_mean"] < 0.999  # ... counts the first epoch only


@pytest.mark.slow
def test_image_kl_to_the_base_sr_model_is_zero_at_the_start_and_grows_after_an_update(models, chains, port):
    """grpo.image_kl_beta: the first step starts from the base weights, so the KL is exactly 0 and so is its
    gradient (the update equals the one without the term); after one update the KL is positive."""
    batch, rollouts = chains
    plain = one_rank_worker(models, port, "policy.freeze=true").train_step(batch, *rollouts)
    worker = one_rank_worker(models, port, "policy.freeze=true", "grpo.image_kl_beta=0.5")
    assert worker.models.sr.reference is not None and "image_kl" not in plain
    first = worker.train_step(batch, *rollouts)
    assert first["image_kl"] == 0.0
    for key in ("image_loss", "diffusion_grad_norm"):
        assert first[key] == pytest.approx(plain[key], rel=1e-6), key
    second = worker.train_step(batch, *rollouts)
    assert second["image_kl"] > 0


@pytest.mark.slow
def test_image_branches_train_like_separate_chains_with_the_same_advantages(models, chains, port):
    """grpo.image_group_size: a chain carrying two image branches (its traces, then a second set) trains the SR model
    exactly as two chains holding one branch each, every branch with its own advantage; one UNet call per (stage,
    step) covers all branches."""
    _, rollouts = chains
    image_adv = [0.7, -1.3, 0.2, 0.4]
    separate = one_rank_worker(models, port, "policy.freeze=true", "learner.micro_batch_size=4").train_chains(
        [ChainAdvantage(0.0, image=a) for a in image_adv], False, *rollouts)
    merged = [replace(rollouts[i], traces=rollouts[i].traces + rollouts[i + 1].traces,
                      branch_images=({"final": np.zeros((32, 32, 3), np.uint8)},)) for i in (0, 2)]
    worker = one_rank_worker(models, port, "policy.freeze=true")
    calls: list[int] = []
    rescore = worker.engine("diffusion").module.sr.trace_log_probs

    def counting(traces, step_indices=None):
        calls.append(len(traces))
        return rescore(traces, step_indices)

    worker.engine("diffusion").module.sr.trace_log_probs = counting
    branched = worker.train_chains([ChainAdvantage(0.0, image_branches=tuple(image_adv[i:i + 2])) for i in (0, 2)],
                                   False, *merged)
    assert branched["diffusion_steps"] == separate["diffusion_steps"] and branched["chains"] == 2
    assert calls == [4] * 4  # 2 stages x 2 steps, each one call over 2 chains x 2 branches
    for key in ("image_loss", "diffusion_grad_norm", "image_first_epoch_ratio_mean"):
        assert branched[key] == pytest.approx(separate[key], rel=1e-5), key
    assert branched["image_first_epoch_ratio_mean"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_nft_moves_the_sr_model_towards_better_images_and_away_from_worse_ones(models, chains, port, sign):
    """grpo.image_objective {name: nft}: after an update with advantage +1 on every chain the model's x_0 prediction
    at the chains' noised images is closer to those images; with -1, farther. No likelihood is involved, so there is
    no image ratio to check; two update epochs reuse the first one's predictions as the old policy's."""
    _, rollouts = chains
    worker = one_rank_worker(models, port, "policy.freeze=true", "grpo.image_objective={name: nft, beta: 1.0}",
                             "grpo.update_epochs=2", "learner.diffusion_optim.lr=1e-3")
    traces = [r.traces[1] for r in rollouts]  # the middle stage, 32 px

    def error() -> float:
        with torch.no_grad():
            sr = worker.engine("diffusion").module.sr
            prediction, x0, _ = sr.forward_process(traces, 1, torch.Generator().manual_seed(5))
        return float((prediction - x0).pow(2).mean())

    before = error()
    m = worker.train_chains([ChainAdvantage(0.0, image=sign) for _ in rollouts], False, *rollouts)
    after = error()
    assert (after < before) if sign > 0 else (after > before), (before, after)
    assert "image_first_epoch_ratio_mean" not in m and m["nft_positive"] > 0 and m["nft_negative"] > 0
    assert m["diffusion_steps"] == 4 * 2 * 2 and m["optimizer_steps"] == 2


@pytest.mark.slow
def test_off_policy_correction_is_the_identity_when_the_sampling_policy_is_the_learners(models, chains, port):
    """The four chains labelled one version older than the learner, whose weights are still the ones that sampled
    them: the proximal re-scoring reproduces the behaviour log-probs, so every truncated importance weight is 1
    and the update is the on-policy one (learner.off_policy)."""
    batch, rollouts = chains
    on_policy = one_rank_worker(models, port).train_step(batch, *rollouts)
    m = one_rank_worker(models, port).train_step(batch, *rollouts, version=1, max_staleness=1)
    assert m["off_policy_chains"] == 4 and m["staleness_max"] == 1 and m["dropped_stale_chains"] == 0
    for kind in ("text", "image"):
        assert m[f"tis_{kind}_ratio_mean"] == pytest.approx(1.0, abs=1e-4), kind
        assert m[f"tis_{kind}_truncated_fraction"] == 0.0, kind
    for key in ("text_loss", "image_loss", "policy_grad_norm", "diffusion_grad_norm"):
        assert m[key] == pytest.approx(on_policy[key], rel=1e-4, abs=1e-6), key
    assert "tis_image_ratio_mean" not in on_policy and on_policy["off_policy_chains"] == 0
    assert on_policy["tis_text_ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # the engine gap's correction


@pytest.mark.slow
def test_chains_older_than_max_staleness_are_not_trained_on(models, chains, port):
    """Learner at version 3, k = 1: the two chains sampled by version 3 train, the two by version 0 are dropped."""
    batch, rollouts = chains
    fresh = [i % 2 == 0 for i in range(len(rollouts))]
    labelled = [replace(r, policy_version=3, diffusion_version=3) if f else r for r, f in zip(rollouts, fresh)]
    m = one_rank_worker(models, port).train_step(batch, *labelled, version=3, max_staleness=1)
    keep = torch.tensor(fresh)
    assert m["dropped_stale_chains"] == 2 and m["off_policy_chains"] == 0
    assert m["tokens"] == int(batch.loss_mask[keep].sum()) and m["diffusion_steps"] == int(batch.step_mask[keep].sum())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_a_non_finite_loss_skips_the_update_and_is_counted(models, chains, port, stage):
    """NaN advantages make the loss and every gradient NaN: under ZeRO-0 (the project's clipping hook) and ZeRO-2
    (DeepSpeed's optimizer) both models' updates are skipped, the weights stay as they were, and the next finite
    step trains normally (no NaN left in the optimizer's moments)."""
    batch, rollouts = chains
    worker = one_rank_worker(models, port, f"learner.zero_stage={stage}")
    nan = replace(batch, advantages=torch.full_like(batch.advantages, float("nan")),
                  step_advantages=torch.full_like(batch.step_advantages, float("nan")))
    before = {m: worker.gather_full_state(m) for m in ("policy", "diffusion")}
    skipped = worker.train_step(nan, *rollouts)
    after = {m: worker.gather_full_state(m) for m in ("policy", "diffusion")}
    assert skipped["skipped_updates"] == 2 and worker.optimizer_steps == 0
    assert "policy_grad_norm" not in skipped and "diffusion_grad_norm" not in skipped
    for m in before:
        assert all(torch.equal(before[m][n], after[m][n]) for n in before[m]), m
    trained = worker.train_step(batch, *rollouts)
    again = worker.gather_full_state("policy")
    assert trained["skipped_updates"] == 0 and worker.optimizer_steps == 1
    assert all(torch.isfinite(t).all() for t in again.values())
    assert any(not torch.equal(after["policy"][n], again[n]) for n in again)


class _Payload:
    """What an attacker who can write the checkpoint folder plants: unpickling it runs ``Path.touch(marker)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_a_checkpoint_file_with_a_planted_pickle_payload_is_refused_by_name(models, port, tmp_path):
    """Resume and healing load DeepSpeed's shards with torch's weights-only unpickler: a real ZeRO-2 checkpoint loads,
    one whose optimizer file carries a payload is refused naming that file, and the payload never runs."""
    from learner.checkpoint_engine import CheckpointRefused

    worker = one_rank_worker(models, port, "learner.zero_stage=2")
    worker.save_checkpoint(str(tmp_path / "ckpt"))
    worker.load_checkpoint(str(tmp_path / "ckpt"))  # DeepSpeed's own files pass the weights-only load
    target = sorted((tmp_path / "ckpt" / "policy").rglob("*optim_states.pt"))[0]
    marker = tmp_path / "payload-ran"
    torch.save({"optimizer_state_dict": _Payload(marker)}, target)
    with pytest.raises(CheckpointRefused, match=f"{target}: refused"):
        worker.load_checkpoint(str(tmp_path / "ckpt"))
    assert not marker.exists()


def test_a_trainable_pattern_that_matches_nothing_is_named():
    from learner.policy_model import restrict_trainable

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    assert restrict_trainable(model, [r"^1\."]) == ["1.weight", "1.bias"]
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    with pytest.raises(ValueError, match=r"\['lm_head'\] match no parameter of Sequential"):
        restrict_trainable(model, ["lm_head", "0.weight"])


# ======================================================================================= Ray, 2 ranks, ZeRO-2
@pytest.fixture(scope="module")
def group(ray_local, models):
    from learner.group import LearnerGroup

    cfg = learner_config(models, "learner.num_ranks=2", "learner.zero_stage=2", "learner.micro_batch_size=1")
    t = time.perf_counter()
    g = LearnerGroup(cfg)
    TIMINGS["Ray 2-rank ZeRO-2 group start"] = time.perf_counter() - t
    TIMINGS["rank setup (in actor)"] = max(i["setup_seconds"] for i in g.infos)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def group_step(ray_local, group, chains) -> dict:
    """The group's first step: its metrics, and the group's policy weights and both models' per-rank
    parameter digests right after it (later fixtures train the group on and end it)."""
    batch, rollouts = chains
    refs = [ray_local.put(r) for r in rollouts]  # as the driver holds them: each rank fetches only its shard
    t = time.perf_counter()
    metrics = group.train(refs, [ChainAdvantage(float(a)) for a in batch.step_advantages[:, 0]], [True] * len(refs))
    TIMINGS["Ray 2-rank ZeRO-2 train step (4 chains)"] = time.perf_counter() - t
    return {"metrics": metrics, "policy": group.gather_full_state("policy"),
            "digests": {model: group.parameter_digests(model) for model in ("policy", "diffusion")}}


@pytest.fixture(scope="module")
def image_advantage_steps(ray_local, group, group_step, chains) -> tuple[dict, dict]:
    """Two more group steps after ``group_step``: text advantages with zero image advantages, then the other
    way round (grpo.image_rewards): their metrics."""
    _, rollouts = chains
    refs = [ray_local.put(r) for r in rollouts]
    n = len(refs)
    signs = [1.0 if i % 2 else -1.0 for i in range(n)]
    text_only = group.train(refs, [ChainAdvantage(a, image=0.0) for a in signs], [True] * n)
    image_only = group.train(refs, [ChainAdvantage(0.0, image=a) for a in signs], [True] * n)
    return text_only, image_only


@pytest.mark.slow
def test_group_forms_one_zero_group(group):
    assert [i["rank"] for i in group.infos] == [0, 1]
    assert all(i["world_size"] == 2 and i["zero_stage"] == 2 for i in group.infos)
    assert all(i["trained"] == ["diffusion", "policy"] for i in group.infos)
    assert group.master[1] > 0


@pytest.mark.slow
def test_an_error_the_ranks_code_raises_is_not_a_lost_actor(group, tmp_path):
    """Every rank raises (no learner checkpoint in the folder) and every rank stays alive: the driver ends the run at
    once instead of rebuilding the roles (``RayTransport.is_lost`` reads the cluster's actor table)."""
    from rl.transport import RayTransport

    transport = RayTransport()
    transport.death_grace_s = 1.0
    with pytest.raises(FileNotFoundError, match="not a learner checkpoint") as raised:
        group.load_checkpoint(str(tmp_path))
    assert group.lost_actors() == [] and not transport.is_lost(raised.value, [group])


@pytest.mark.slow
def test_two_ranks_train_like_one_rank_holding_the_whole_batch(group, group_step, zero3):
    m, solo = group_step["metrics"], zero3["metrics"]
    # Global token / step counts and DeepSpeed's mean over ranks are undone exactly: the sharded, accumulated
    # update has the loss and gradient norm of the unsharded batch.
    for key in ("tokens", "diffusion_steps", "chains", "text_loss", "image_loss", "text_ratio_mean"):
        assert m[key] == pytest.approx(solo[key], abs=1e-5), key
    for key in ("policy_grad_norm", "diffusion_grad_norm"):
        assert m[key] == pytest.approx(solo[key], rel=1e-4), key
    weights = group_step["policy"]  # gathered right after the step
    for name, tensor in zero3["after"]["policy"].items():
        torch.testing.assert_close(weights[name], tensor, atol=2e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_replicas_stay_identical_on_both_ranks(group, group_step, zero3):
    digests = group_step["digests"]  # taken right after the step
    for model, (rank0, rank1) in digests.items():
        assert rank0 == rank1, model  # bitwise: ZeRO-2 all-gathers the same updated partitions
        before = {k: float(v.double().sum()) for k, v in zero3["before"][model].items()}
        assert any(before[k] != v for k, v in rank0.items()), model  # ... and the step did change them


@pytest.mark.slow
def test_image_advantages_drive_only_the_diffusion_update(image_advantage_steps):
    # grpo.image_rewards: the text keeps its advantages, the diffusion steps get their own (zeros here), so
    # the SR model gets no gradient while the policy does; and the other way round.
    text_only, image_only = image_advantage_steps
    assert text_only["policy_grad_norm"] > 0 and text_only["diffusion_grad_norm"] == 0.0
    assert image_only["policy_grad_norm"] == 0.0 and image_only["diffusion_grad_norm"] > 0


@pytest.mark.slow
def test_group_checkpoint_loads_into_a_fresh_group(group, group_step, image_advantage_steps, models, tmp_path):
    """Ends the group: it requests every fixture that trains the group, so they run before it in any order."""
    from learner.group import LearnerGroup

    saved = {m: group.gather_full_state(m) for m in ("policy", "diffusion")}
    t = time.perf_counter()
    group.save_checkpoint(str(tmp_path))
    TIMINGS["Ray 2-rank save_checkpoint"] = time.perf_counter() - t
    group.shutdown()  # frees the CPUs; the fresh group must not rely on anything the old one held
    cfg = learner_config(models, "learner.num_ranks=2", "learner.zero_stage=2", "learner.micro_batch_size=1")
    t = time.perf_counter()
    with LearnerGroup(cfg) as fresh:
        TIMINGS["Ray fresh group start"] = time.perf_counter() - t
        t = time.perf_counter()
        fresh.load_checkpoint(str(tmp_path))
        TIMINGS["Ray 2-rank load_checkpoint"] = time.perf_counter() - t
        for m in ("policy", "diffusion"):
            restored = fresh.gather_full_state(m)
            assert all(torch.equal(restored[k], v) for k, v in saved[m].items()), m
        assert fresh.parameter_digests("policy")[0] == fresh.parameter_digests("policy")[1]
        t = time.perf_counter()
        fresh.export_hf(str(tmp_path / "export"))
        TIMINGS["Ray 2-rank export_hf"] = time.perf_counter() - t


def teardown_module(module):
    if TIMINGS:
        print("\nlearner timings (s): " + ", ".join(f"{k}: {v:.1f}" for k, v in TIMINGS.items()))
