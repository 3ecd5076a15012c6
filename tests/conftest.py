"""Shared fixtures: the tiny models (built once per session), a free port for in-process learner ranks, and a
private local Ray cluster per module. Each fixture builds real components; nothing here is a mock."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from core.config import TinyDiffusionConfig, TinyPolicyConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

# The learner and cold-start tests train many steps: an even smaller policy and SR model than the embedded
# default's (one layer, hidden 64, a 2-level UNet), the same classes and layouts.
SMALL_POLICY = TinyPolicyConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
                                vision_hidden_size=32, vision_depth=1, vision_heads=2)
SMALL_DIFFUSION = TinyDiffusionConfig(block_out_channels=[16, 32], num_levels=2, text_hidden_size=32,
                                      text_layers=1, text_max_length=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """``free_port()``: a TCP port free on 127.0.0.1 right now."""
    return _free_port


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The embedded default's tiny random models (configs/grpo_random_local.yaml's policy.tiny / diffusion.tiny)."""
    from models.bootstrap import build_all

    cfg = load_config(ROOT / "configs/grpo_random_local.yaml")
    return build_all(tmp_path_factory.mktemp("tiny_models"), cfg.policy.tiny, cfg.diffusion.tiny)


@pytest.fixture(scope="session")
def small_models(tmp_path_factory) -> dict[str, Path]:
    """SMALL_POLICY / SMALL_DIFFUSION, the SR model with the policy's tokenizer (as the bootstrap does)."""
    from transformers import AutoTokenizer

    from models.bootstrap import build_tiny_diffusion
    from models.tiny import build_tiny_policy

    root = tmp_path_factory.mktemp("small_models")
    build_tiny_policy(SMALL_POLICY, root / "policy")
    build_tiny_diffusion(SMALL_DIFFUSION, root / "diffusion", AutoTokenizer.from_pretrained(str(root / "policy")))
    return {"policy": root / "policy", "diffusion": root / "diffusion", "root": root}


@pytest.fixture(scope="module")
def port() -> int:
    """One process-group port for every in-process learner worker of a module (world size 1)."""
    return _free_port()


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray cluster for the module: 4 logical CPUs, workers with the runs' environment."""
    import ray

    from core.env import worker_env

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    yield ray
    ray.shutdown()
