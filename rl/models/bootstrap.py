"""Build the tiny random models of the embedded default, offline, in seconds.

python -m rl.models.bootstrap OUT_DIR [--config configs/grpo_local.yaml] [--force]

writes ``OUT_DIR/policy`` (Qwen2.5-VL, HF format) and ``OUT_DIR/diffusion`` (diffusers layout). The trainer
calls ``ensure_models(cfg)`` instead, which builds ``policy.path`` / ``diffusion.path`` only when missing and
``bootstrap: true``. Every build goes to a temporary directory that is renamed into place, so a crash never
leaves a half-written model where a later run would load it.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

from rl.config import ExperimentConfig, TinyDiffusionConfig, TinyPolicyConfig, load_config
from rl.models.policy import PathLike, atomic_dir, build_tiny_policy

DEFAULT_CONFIG = "configs/grpo_local.yaml"


class ModelMissingError(FileNotFoundError):
    """A configured model directory does not exist and the config does not allow building it."""


def _sr_pipeline_builder() -> Optional[Callable]:
    """``actors.sr_pipeline.build_tiny_sr_pipeline`` if that module provides it, else None."""
    try:
        module = importlib.import_module("actors.sr_pipeline")
    except ModuleNotFoundError as exc:
        if exc.name not in ("actors.sr_pipeline", "actors"):
            raise  # the module exists but one of its own imports is broken: say so
        return None
    return getattr(module, "build_tiny_sr_pipeline", None)


def build_tiny_diffusion(cfg: TinyDiffusionConfig, out_dir: PathLike, tokenizer=None) -> Path:
    """Build the random SR diffusion pipeline into ``out_dir`` (atomically).

    The diffusion text encoder reads the same chain text as the policy, so it gets the policy's tokenizer.
    """
    build = _sr_pipeline_builder()
    if build is None:
        raise NotImplementedError("actors.sr_pipeline.build_tiny_sr_pipeline is not available yet")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"diffusion directory already exists: {out}")
    if tokenizer is None:
        from rl.models.tokenizer import build_chain_tokenizer

        tokenizer = build_chain_tokenizer(cfg.vocab_size)
    pipeline = build(cfg, tokenizer)
    with atomic_dir(out) as tmp:
        pipeline.save_pretrained(tmp)
    return out


def build_all(
    out_dir: PathLike,
    policy: TinyPolicyConfig,
    diffusion: TinyDiffusionConfig,
    force: bool = False,
    require_diffusion: bool = False,
) -> dict[str, Path]:
    """Build ``out_dir/policy`` and ``out_dir/diffusion``; existing ones are kept unless ``force``."""
    out = Path(out_dir)
    built: dict[str, Path] = {}
    targets = {"policy": out / "policy", "diffusion": out / "diffusion"}
    if force:
        for path in targets.values():
            shutil.rmtree(path, ignore_errors=True)
    if not targets["policy"].exists():
        build_tiny_policy(policy, targets["policy"])
    built["policy"] = targets["policy"]
    if not targets["diffusion"].exists():
        if _sr_pipeline_builder() is not None:
            build_tiny_diffusion(diffusion, targets["diffusion"])
        elif require_diffusion:
            raise NotImplementedError("actors.sr_pipeline.build_tiny_sr_pipeline is not available yet")
    if targets["diffusion"].exists():
        built["diffusion"] = targets["diffusion"]
    return built


INIT_SOURCE_FILE = ".init_from"  # inside <output_dir>/init/<model>: the resolved path it was copied from
_INIT_MARKERS = {"policy": ("config.json", "an HF Qwen2.5-VL directory"),
                 "diffusion": ("model_index.json", "a diffusers SR pipeline directory")}


def apply_init_from(cfg: ExperimentConfig) -> dict[str, Path]:
    """Start the run from ``policy.init_from`` / ``diffusion.init_from`` (e.g. a cold-start checkpoint's
    ``export/policy`` and ``export/diffusion``): copy each into ``<output_dir>/init/<model>`` once and point
    ``<model>.path`` at the copy, so rollout workers and learner ranks all load the same weights, and the run
    does not depend on the source staying put. Call before any actor starts. Returns {model: copy}.

    A copy made earlier from the same source is reused; one from another source is replaced. Raises
    ModelMissingError naming the key and the path when the source is not a model directory.
    """
    out: dict[str, Path] = {}
    for key, sub in (("policy", cfg.policy), ("diffusion", cfg.diffusion)):
        if not sub.init_from:
            continue
        marker, what = _INIT_MARKERS[key]
        src = Path(sub.init_from)
        if not (src / marker).is_file():
            raise ModelMissingError(
                f"{key}.init_from = {sub.init_from!r}: not {what} ({src / marker} is missing)"
            )
        dst = Path(cfg.output_dir) / "init" / key
        source = str(src.resolve())
        stamp = dst / INIT_SOURCE_FILE
        if not (stamp.is_file() and stamp.read_text() == source):
            if dst.exists():
                shutil.rmtree(dst)
            with atomic_dir(dst) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
                (tmp / INIT_SOURCE_FILE).write_text(source)
        sub.path = str(dst)
        out[key] = dst
    return out


def ensure_models(cfg: ExperimentConfig) -> None:
    """Make sure ``policy.path`` and ``diffusion.path`` exist: build the tiny random ones where allowed.

    ``<model>.init_from``, when set, wins: the path becomes a copy of it (``apply_init_from``). Raises
    ModelMissingError naming the key and the path when a directory is missing and its ``bootstrap`` is
    false. Existing directories are never touched (a real checkpoint is never overwritten).
    """
    apply_init_from(cfg)
    if not Path(cfg.policy.path).exists():
        if not cfg.policy.bootstrap:
            raise ModelMissingError(
                f"policy.path = {cfg.policy.path!r} does not exist and policy.bootstrap is false "
                "(point policy.path at an HF Qwen2.5-VL directory, or set policy.bootstrap=true)"
            )
        build_tiny_policy(cfg.policy.tiny, cfg.policy.path)
    if not Path(cfg.diffusion.path).exists():
        if not cfg.diffusion.bootstrap:
            raise ModelMissingError(
                f"diffusion.path = {cfg.diffusion.path!r} does not exist and diffusion.bootstrap is false "
                "(point diffusion.path at a diffusers SR pipeline directory, or set diffusion.bootstrap=true)"
            )
        build_tiny_diffusion(cfg.diffusion.tiny, cfg.diffusion.path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl.models.bootstrap", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", help="writes OUT_DIR/policy and OUT_DIR/diffusion")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="takes policy.tiny and diffusion.tiny from here"
    )
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    built = build_all(args.out_dir, cfg.policy.tiny, cfg.diffusion.tiny, force=args.force)
    for name, path in built.items():
        print(f"{name}: {path}")
    if "diffusion" not in built:
        print("diffusion: skipped (actors.sr_pipeline.build_tiny_sr_pipeline not available)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
