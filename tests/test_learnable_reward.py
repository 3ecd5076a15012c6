"""The image gradient path stays proven: on a reward the SR model can surely move (``brightness``, the mean
intensity of the final image, rewards.sanity_metrics), a short GRPO run of the images alone (DiffusionNFT, the main
job's image objective) raises the held-out reward beyond its placebo (the same run with the advantages shuffled
within each group, grpo.advantage_transforms: placebo_shuffle) at the same step, from the same start and seed. The
run goes through the roles every driver uses (the rollout's chain sampler and SR pipeline, the reward pool, the
DeepSpeed learner and the weight sync into the sampler) in one process (``rl.one_process``, the same trainer over
in-process groups): Ray and vLLM are the other tests' subject, and leaving them out keeps this near a minute and a
half. docs/journal/2026-12-07-known-learnable-brightness.md has the settings tried (the trajectory objective did
not separate from its placebo in so few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_config
from rl.monitor import read_scalars
from rl.one_process import fit

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
KEY = "eval/reward/generation/mean"


def _run(tmp: Path, models: dict, name: str, port: int, *extra: str) -> dict[str, list]:
    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", [
        f"policy.path={models['policy']}", f"diffusion.path={models['diffusion']}", "policy.bootstrap=false",
        "diffusion.bootstrap=false", f"output_dir={tmp}/{name}", "learner.num_ranks=1", "rollout.engine=hf",
        "chain.max_stage_tokens=8", "diffusion.num_steps=4",
        "policy.freeze=true",  # the images alone learn: the texts are sampled, not trained
        "reward.weights={format: 0.0, degradation: 0.0, understanding: 0.0, generation: 1.0}",
        "reward.metrics=[{name: brightness, weight: 1.0, scale: 1.0}]", "reward.full_reference=[]",
        "grpo.image_objective={name: nft, beta: 1.0, adv_clip: 5.0}", "learner.diffusion_optim.lr=1.0e-4",
        "grpo.prompts_per_step=2", "grpo.group_size=4",
        "learner.micro_batch_size=8",  # one pass a step: the same gradient in fewer, larger UNet calls
        f"trainer.total_steps={STEPS}", f"trainer.eval_every={STEPS}", "trainer.eval_images=4",
        "trainer.checkpoint_every=0", "trainer.image_every=0", "trainer.progress_bar=false", *extra])
    fit(cfg, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    return read_scalars(tmp / name / "tensorboard")


def test_brightness_rises_beyond_its_placebo(tiny_models, tmp_path, free_port):
    trained = _run(tmp_path, tiny_models, "trained", free_port())
    placebo = _run(tmp_path, tiny_models, "placebo", free_port(), "grpo.advantage_transforms=[{name: placebo_shuffle}]")
    (s0, start), (s1, end) = trained[KEY][0], trained[KEY][-1]
    assert (s0, s1) == (0, STEPS) and placebo[KEY][0] == trained[KEY][0]  # one start, evaluated the same way
    gain, placebo_gain = end - start, placebo[KEY][-1][1] - start
    print({"start": round(start, 4), "trained": round(end, 4), "placebo": round(placebo[KEY][-1][1], 4)})
    assert gain > 0.03 and gain > placebo_gain + 0.03, (start, end, placebo[KEY][-1][1])
