"""Shared helpers of the learner tests (tests/test_learner.py, tests/test_lora.py): the advantages of the
four sampled chains, real chains sampled from the small models, and in-process world-size-1 learner workers.
Plain constants and functions, not fixtures (those live in tests/conftest.py), and not a test module: pytest
collects only test_*.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.config import ExperimentConfig, load_config
from core.records import Rollout
from learner.worker import LearnerWorker
from models.chain_tokens import sequence_log_probs

ROOT = Path(__file__).resolve().parents[1]
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])  # one per chain of sample_rollouts()'s default 2 x 2


def sample_rollouts(
    policy_dir: Path, diffusion_dir: Path, prompts: int = 2, group: int = 2, steps: int = 2
) -> list[Rollout]:
    """Real chains: random text turns around two inserted stage images sampled by the SR pipeline.

    Text log-probs come from a direct HF forward of the full sequence (no learner code involved)."""
    from models.chain_tokens import ChainTokens
    from models.policy import load_policy
    from models.sr_pipeline import SRPipeline

    tok = ChainTokens.from_pretrained(policy_dir)
    model = load_policy(policy_dir)
    pipe = SRPipeline.from_pretrained(str(diffusion_dir))
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    special = set(tok.tokenizer.all_special_ids)
    vocab = [i for i in range(len(tok.tokenizer)) if i not in special]
    n = prompts * group
    lrs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(prompts)]
    conds = [lrs[i // group] for i in range(n)]
    rough, rough_tr = pipe.sample(
        conds, (16, 16), ["rough"] * n, num_steps=steps, generator=gen, stage="rough"
    )
    middle, mid_tr = pipe.sample(rough, (32, 32), ["mid"] * n, num_steps=steps, generator=gen, stage="middle")
    out = []
    for p, lr in enumerate(lrs):
        prompt = tok.prompt_ids(lr)
        for s in range(group):
            i = p * group + s
            turns = [[int(x) for x in rng.choice(vocab, int(rng.integers(2, 6)))] for _ in range(3)]
            sections = [tok.image_section_ids("rough", rough[i]), tok.image_section_ids("middle", middle[i])]
            ids = turns[0] + sections[0] + turns[1] + sections[1] + turns[2]
            mask = torch.tensor(
                [1] * len(turns[0])
                + [0] * len(sections[0])
                + [1] * len(turns[1])
                + [0] * len(sections[1])
                + [1] * len(turns[2])
            )
            images = [lr, rough[i], middle[i]]
            with torch.no_grad():  # the engines' definition: 3D M-RoPE positions, banned ids masked
                inputs = tok.batch_inputs([prompt + ids], [images])
                banned = tok.banned_ids(model.config.get_text_config().vocab_size)
                logp = sequence_log_probs(model, inputs, banned_ids=banned)[0, len(prompt):]
            out.append(
                Rollout(
                    prompt_id=p,
                    sample_index=s,
                    policy_version=0,
                    diffusion_version=0,
                    prompt_ids=torch.tensor(prompt),
                    token_ids=torch.tensor(ids),
                    text_mask=mask,
                    log_probs=torch.where(mask.bool(), logp, torch.zeros(())),
                    text="",
                    images={"rough": rough[i], "middle": middle[i]},
                    context_images=images,
                    traces=(rough_tr[i], mid_tr[i]),
                )
            )
    return out


def learner_config(models, *overrides: str) -> ExperimentConfig:
    """configs/grpo_random_local.yaml on ``models`` (policy/diffusion paths), two prompts of two chains."""
    return load_config(
        ROOT / "configs/grpo_random_local.yaml",
        [
            f"policy.path={models['policy']}",
            f"diffusion.path={models['diffusion']}",
            "grpo.group_size=2",
            "grpo.prompts_per_step=2",
            "learner.num_cpus=0.5",
            "trainer.total_steps=4",
            *overrides,
        ],
    )


def one_rank_worker(models, port: int, *overrides: str) -> LearnerWorker:
    """A fresh world-size-1 ZeRO-2 worker, two chains a micro-batch."""
    return solo_worker(learner_config(models, "learner.num_ranks=1", "learner.zero_stage=2",
                                      "learner.micro_batch_size=2", *overrides), port)


def solo_worker(cfg: ExperimentConfig, port: int) -> LearnerWorker:
    """A world-size-1 in-process LearnerWorker on ``port`` (the module's ``port`` fixture)."""
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    return LearnerWorker.from_config(cfg, env)
