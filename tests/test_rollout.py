"""RolloutWorker / ChainSampler: interleaved multimodal episodes with a real vLLM engine and SR diffusion.

Each chain is three text turns with the stage images fed back as real image inputs; the record carries
exactly the token sequence the learner re-scores, a mask that is 1 only on sampled tokens, and the traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.chain import IMAGE_TAGS, parse_chain
from core.config import load_config
from data.dataset import PairDataset
from models.chain_tokens import sequence_log_probs
from models.policy import load_policy

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
B, G = 2, 3


@pytest.fixture(scope="module")
def run(tiny_models):
    from actors.rollout import RolloutWorker

    models = tiny_models
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", [
        f"policy.path={models['policy']}", f"diffusion.path={models['diffusion']}", "diffusion.num_steps=3",
        "chain.max_stage_tokens=12"])
    worker = RolloutWorker(cfg)
    samples = PairDataset(cfg.data, "train").batch(0, B)
    rollouts = worker.generate(samples, G, seed=7)
    yield {"cfg": cfg, "worker": worker, "samples": samples, "rollouts": rollouts, "models": models}
    worker.close()


def test_records_are_grouped_and_ordered(run):
    rs = run["rollouts"]
    assert len(rs) == B * G
    assert [(r.prompt_id, r.sample_index) for r in rs] == [(s.prompt_id, g) for s in run["samples"] for g in range(G)]
    assert all(r.policy_version == 0 and len(r.finish_reasons) == 3 for r in rs)
    # the denoising traces the learner re-scores are float32 whatever the SR model's dtype
    assert all(t.latents.dtype == t.log_probs.dtype == torch.float32 for r in rs for t in r.traces)


def test_mask_is_one_only_on_sampled_tokens(run):
    tokens = run["worker"].engine.tokens
    vision = {tokens.image_pad_id, tokens.vision_start_id, tokens.vision_end_id}
    for r in run["rollouts"]:
        ids, mask, lp = r.token_ids.tolist(), r.text_mask.bool(), r.log_probs
        assert len(ids) == len(mask) == len(lp)
        assert not any(t in vision for t, m in zip(ids, mask.tolist()) if m)  # sampled text has no image tokens
        assert sum(t == tokens.image_pad_id for t in ids) > 0  # the rough and middle images were inserted
        assert torch.all(lp[~mask] == 0) and torch.all(lp[mask] <= 0) and torch.isfinite(lp).all()
        assert int(mask.sum()) >= 3  # at least one token per turn


def test_images_sizes_and_context(run):
    lr_h = run["cfg"].data.hr_size // run["cfg"].data.scale
    tokens = run["worker"].engine.tokens
    for r, s in zip(run["rollouts"], [s for s in run["samples"] for _ in range(G)]):
        assert {k: v.shape for k, v in r.images.items()} == {
            "rough": (lr_h, lr_h, 3), "middle": (2 * lr_h, 2 * lr_h, 3), "final": (4 * lr_h, 4 * lr_h, 3)}
        assert np.array_equal(r.context_images[0], s.lr)
        assert np.array_equal(r.context_images[1], r.images["rough"])
        assert np.array_equal(r.context_images[2], r.images["middle"])
        tokens.check_context(r.prompt_ids.tolist() + r.token_ids.tolist(), r.context_images)
        assert [t.stage for t in r.traces] == ["rough", "middle", "final"]
        assert all(t.log_probs.numel() == 3 and torch.isfinite(t.log_probs).all() for t in r.traces)
        parsed = parse_chain(r.text)
        assert all(parsed.image_counts.get(tag) == 1 for tag in IMAGE_TAGS)


def test_learner_view_reproduces_sampling_log_probs_with_the_fed_back_images(run):
    """The HF policy, given the recorded sequence and images, reproduces the sampled log-probs; swapping the
    rough image for a blank one changes them: the image really is an input of the next turn."""
    tokens = run["worker"].engine.tokens
    model = load_policy(run["models"]["policy"]).eval()
    banned = tokens.banned_ids(model.config.get_text_config().vocab_size)
    r = run["rollouts"][0]
    ids = r.prompt_ids.tolist() + r.token_ids.tolist()
    mask = r.text_mask.bool()
    P = r.prompt_ids.numel()
    with torch.no_grad():
        lp = sequence_log_probs(model, tokens.batch_inputs([ids], [r.context_images]), banned_ids=banned)[0, P:]
        blank = [r.context_images[0], np.zeros_like(r.context_images[1]), r.context_images[2]]
        lp_blank = sequence_log_probs(model, tokens.batch_inputs([ids], [blank]), banned_ids=banned)[0, P:]
    assert torch.allclose(lp[mask], r.log_probs[mask], atol=1e-3)
    assert not torch.allclose(lp_blank[mask], r.log_probs[mask], atol=1e-7)


def test_image_branches_leave_the_chains_as_they_are_and_add_whole_image_trajectories(run):
    """grpo.image_group_size = 3: every chain's text, its fed-back images and its own traces are those of the
    one-image run with the same seed (branch 0 draws the same noise; its latents agree to the UNet's float
    rounding at another batch size); two more image trajectories per chain come
    with it, each stage conditioned on the branch's own previous image."""
    sampler = run["worker"].sampler
    sampler.image_group_size = 3
    try:
        branched = run["worker"].generate(run["samples"], G, seed=7)
    finally:
        sampler.image_group_size = 1
    for one, three in zip(run["rollouts"], branched):
        assert torch.equal(one.token_ids, three.token_ids) and one.text == three.text
        # the same images up to the latents' float rounding, which can move a pixel across a uint8 level
        assert all(np.abs(one.images[k].astype(int) - three.images[k].astype(int)).max() <= 1 for k in one.images)
        assert three.image_branches == 3 and len(three.branch_finals) == 2
        # every branch keeps each of its stage images, at that stage's size (stage credit scores them)
        assert all({k: v.shape for k, v in b.items()} == {k: v.shape for k, v in three.images.items()}
                   for b in three.branch_images)
        assert three.scoring_view().branch_images is three.branch_images  # the reward actors read them
        assert [t.stage for t in three.traces] == ["rough", "middle", "final"] * 3
        # the same noise; the UNet's batch differs (float rounding), and a fed-back uint8 image a level off moves
        # the next stage's condition by 1/255
        for a, b in zip(one.traces, three.traces[:3]):
            torch.testing.assert_close(a.latents, b.latents, atol=1e-2, rtol=0)
            torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-3, rtol=0)
        finals = [three.images["final"], *three.branch_finals]
        assert all(f.shape == finals[0].shape for f in finals)
        assert not np.array_equal(finals[0], finals[1]) and not np.array_equal(finals[1], finals[2])
        # a branch's middle stage is conditioned on that branch's rough image, not on branch 0's
        assert not torch.equal(three.traces[4].condition, three.traces[1].condition)
        assert torch.equal(three.traces[4].text_ids, three.traces[1].text_ids)  # the same stage text


def test_detail_gains_are_log_normal_per_seed():
    from actors.chain_sampler import detail_gains

    gains = np.log(detail_gains(0.3, range(4000)))
    assert abs(gains.mean()) < 0.02 and abs(gains.std() - 0.3) < 0.02
    assert detail_gains(0.3, [5, 6]) == detail_gains(0.3, [5, 6]) and detail_gains(0.3, [5])[0] != detail_gains(
        0.3, [6])[0]
    assert detail_gains(0.0, [5, 6]) == [1.0, 1.0]


def test_training_rollouts_explore_detail_gains_and_held_out_ones_do_not(run, monkeypatch):
    """experimental.detail_gain_std > 0: each training image's sampled residual is scaled by its own gain (the rough
    stage, sampled from the same LR and noise, shows it exactly); ``explore=False`` (held-out evaluation) samples the
    model as it is, identical to a run without the key."""
    from actors.chain_sampler import _seed, detail_gains

    monkeypatch.setattr(run["worker"].sampler, "detail_gain_std", 0.3)
    held_out = run["worker"].generate(run["samples"], G, seed=7, explore=False)
    for one, h in zip(run["rollouts"], held_out):
        assert torch.equal(one.token_ids, h.token_ids)
        assert all(np.array_equal(one.images[k], h.images[k]) for k in one.images)
    explored = run["worker"].generate(run["samples"], G, seed=7)
    ratios = []
    for one, e in zip(run["rollouts"], explored):
        (gain,) = detail_gains(0.3, [_seed(7, e.prompt_id, 0, e.sample_index, 13)])
        a, b = one.traces[0], e.traces[0]
        assert a.stage == b.stage == "rough" and torch.equal(a.latents[:-1], b.latents[:-1])
        torch.testing.assert_close(b.latents[-1], gain * a.latents[-1], atol=1e-6, rtol=0)
        ratios.append(gain)
    assert len(set(ratios)) == len(ratios) and max(abs(np.log(ratios))) > 0.05


def test_the_held_out_evaluation_asks_the_rollout_actors_not_to_explore():
    """rl.held_out samples the model as it is: its generate call carries explore=False."""
    from rl.held_out import HeldOutEval

    class Asked(Exception):
        pass

    class Rollouts:
        def submit_generate(self, samples, group_size, seed, explore=True):
            raise Asked(explore)

    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", ["trainer.eval_every=5",
                                                               "experimental.detail_gain_std=0.3",
                                                               "grpo.image_objective={name: nft}"])
    with pytest.raises(Asked) as asked:
        HeldOutEval(cfg).run(Rollouts(), None, fetch=lambda chains: chains)
    assert asked.value.args == (False,)


def test_an_actor_whose_vllm_engine_died_exits_for_ray_to_restart_it():
    """vLLM raises EngineDeadError once its EngineCore process is gone; the rollout actor then ends its process
    (Ray restarts it with a fresh engine and re-runs the call); any other error is raised as it is."""
    import subprocess
    import sys

    from actors.rollout import ENGINE_DEAD_EXIT

    code = (
        "from actors.rollout import exits_when_the_engine_dies\n"
        "from vllm.v1.engine.exceptions import EngineDeadError\n"
        "class Actor:\n"
        "    worker_index = 0\n"
        "    @exits_when_the_engine_dies\n"
        "    def generate(self, error):\n"
        "        raise error\n"
        "try:\n"
        "    Actor().generate(ValueError('a bug'))\n"
        "except ValueError:\n"
        "    print('raised')\n"
        "Actor().generate(EngineDeadError())\n"
        "print('still alive')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == ENGINE_DEAD_EXIT, out.stderr[-2000:]
    assert out.stdout.split() == ["raised"] and "its vLLM engine died" in out.stderr


def test_the_text_engine_spec_follows_the_config():
    """``actors.rollout.text_engine_spec``: each worker its own seed; the policy's adapters only when a sync ships
    them alone (then vLLM serves trainer.max_staleness + 1 versions); the transfer backend the sync uses."""
    from actors.rollout import text_engine_spec

    cfg = load_config(ROOT / "configs/grpo_lora_local.yaml", ["trainer.seed=5", "trainer.max_staleness=2"])
    merged = text_engine_spec(cfg, "cpu", worker_index=3)
    assert (merged.policy_path, merged.sampling, merged.max_tokens) == (
        cfg.policy.path, cfg.rollout.sampling, cfg.chain.max_stage_tokens)
    assert (merged.vllm, merged.dtype, merged.device, merged.seed) == (cfg.rollout.vllm, cfg.policy.dtype, "cpu", 8)
    assert merged.lora is None and merged.transfer == "safetensors_bytes"  # policy.lora.sync: merged
    adapters = text_engine_spec(load_config(ROOT / "configs/grpo_lora_local.yaml", [
        "trainer.max_staleness=2", "policy.lora.sync=adapters", "learner.sync_backend=collective"]), "cpu")
    assert adapters.lora is not None and adapters.lora.sync == "adapters" and adapters.max_loras == 3
    assert adapters.transfer == "safetensors_bytes"  # adapters reach the actor as object-store buckets
    collective = text_engine_spec(load_config(ROOT / "configs/grpo_lora_local.yaml",
                                              ["learner.sync_backend=collective"]), "cpu")
    assert collective.transfer == "cpu_gloo" and collective.lora is None
