"""Shared fixtures: the tiny models (built once per session), a free port for in-process learner ranks, a
private local Ray cluster per module, and the model tools' environment (``env``). Each fixture builds real
components; nothing here is a mock.

Test order (to check that every test passes whatever ran before it): ``REVERSE_TESTS=1`` runs the files in
reverse order and each file's tests in reverse; ``TEST_ORDER_SEED=N`` shuffles the files, and the tests within
each file, with seed N (a file's tests stay together, so its module-scoped fixtures are still built once). The
order used is printed in pytest's header."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest
import torch

from core.config import TinyDiffusionConfig, TinyPolicyConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

# The learner and cold-start tests train many steps: an even smaller policy and SR model than the embedded
# default's (one layer, hidden 64, a 2-level UNet), the same classes and layouts.
SMALL_POLICY = TinyPolicyConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
                                vision_hidden_size=32, vision_depth=1, vision_heads=2)
SMALL_DIFFUSION = TinyDiffusionConfig(block_out_channels=[16, 32], num_levels=2, text_hidden_size=32,
                                      text_layers=1, text_max_length=16)


def _order() -> tuple[bool, int | None]:
    seed = os.environ.get("TEST_ORDER_SEED", "").strip()
    return os.environ.get("REVERSE_TESTS", "").strip() not in ("", "0"), int(seed) if seed else None


def pytest_report_header(config):
    reverse, seed = _order()
    if seed is not None:
        return f"test order: shuffled, TEST_ORDER_SEED={seed} (files, then the tests within each file)"
    if reverse:
        return "test order: reversed (REVERSE_TESTS=1: files, and the tests within each file)"
    return None


# The longest files (minutes each: whole runs with faults, launches, the async pipeline), started first so that
# `make test`'s two workers (pytest-xdist, one file per worker at a time) do not end with one of them alone.
LONGEST_FIRST = (
    "tests/test_chaos.py", "tests/test_launch.py", "tests/test_async.py", "tests/test_trainer.py",
    "tests/test_learnable_reward.py",
)


@pytest.hookimpl(trylast=True)  # after pytest's own (fixture-scope) reordering
def pytest_collection_modifyitems(session, config, items):
    by_file: dict[str, list] = {}
    for item in items:  # files in their collected order, each file's tests in theirs
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item)
    reverse, seed = _order()
    if seed is not None:
        groups = list(by_file.values())
        rng = random.Random(seed)
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
    elif reverse:
        groups = [list(reversed(group)) for group in reversed(by_file.values())]
    else:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        groups = [by_file[f] for f in sorted(by_file, key=lambda f: rank.get(f, len(rank)))]
    items[:] = [item for group in groups for item in group]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fast_model_args() -> list[str]:
    """The model tools' (tools.eval, tools.infer, lab.*) cheapest arguments: the HF engine, short turns, two
    denoising steps."""
    return ["--engine", "hf", "chain.max_stage_tokens=8", "diffusion.num_steps=2"]


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


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    """Tiny models (an export: policy/ + diffusion/), an empty torch hub, and the torch thread count restored
    afterwards."""
    base = tmp_path_factory.mktemp("eval")
    (base / "models").symlink_to(tiny_models["policy"].parent, target_is_directory=True)
    # pyiqa fixes its cache dir at import: import it first, then point both it and TORCH_HOME at an empty
    # folder, so that undo() leaves pyiqa as the other tests of this process expect it
    import pyiqa.utils.download_util as pyiqa_download

    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(base / "torch_home"))
    mp.setattr(pyiqa_download, "DEFAULT_CACHE_DIR", str(base / "torch_home" / "hub" / "pyiqa"))
    threads = torch.get_num_threads()
    yield base
    torch.set_num_threads(threads)
    mp.undo()
