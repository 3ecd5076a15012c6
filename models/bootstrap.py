"""Make sure a run's models exist before any actor starts: build the embedded default's tiny random models where
the config allows it (``models.tiny``), or start from another run's export (``<model>.init_from``).

``ensure_models(cfg)`` builds ``policy.path`` / ``diffusion.path`` only when missing and ``bootstrap: true``;
``build_all`` builds both into one folder (``python -m tools.bootstrap OUT_DIR``). Every build goes to a temporary
directory that is renamed into place, so a crash never leaves a half-written model where a later run would
load it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from core.checkpoint import atomic_dir
from core.config import ExperimentConfig, TinyDiffusionConfig, TinyPolicyConfig
from models.policy import PathLike
from models.tiny import build_tiny_policy, build_tiny_sr_pipeline
from models.tokenizer import build_chain_tokenizer


class ModelMissingError(FileNotFoundError):
    """A configured model directory does not exist and the config does not allow building it."""


def build_tiny_diffusion(cfg: TinyDiffusionConfig, out_dir: PathLike, tokenizer=None) -> Path:
    """Build the random SR diffusion pipeline into ``out_dir`` (atomically).

    The diffusion text encoder reads the same chain text as the policy, so it gets the policy's tokenizer.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"diffusion directory already exists: {out}")
    pipeline = build_tiny_sr_pipeline(cfg, tokenizer if tokenizer is not None else build_chain_tokenizer(cfg.vocab_size))
    with atomic_dir(out) as tmp:
        pipeline.save_pretrained(tmp)
    return out


def build_all(out_dir: PathLike, policy: TinyPolicyConfig, diffusion: TinyDiffusionConfig,
              force: bool = False) -> dict[str, Path]:
    """Build ``out_dir/policy`` and ``out_dir/diffusion``; existing ones are kept unless ``force``."""
    out = Path(out_dir)
    targets = {"policy": out / "policy", "diffusion": out / "diffusion"}
    if force:
        for path in targets.values():
            shutil.rmtree(path, ignore_errors=True)
    if not targets["policy"].exists():
        build_tiny_policy(policy, targets["policy"])
    if not targets["diffusion"].exists():
        build_tiny_diffusion(diffusion, targets["diffusion"])
    return targets


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
    builders = (("policy", cfg.policy, build_tiny_policy), ("diffusion", cfg.diffusion, build_tiny_diffusion))
    for key, sub, build in builders:
        if Path(sub.path).exists():
            continue
        if not sub.bootstrap:
            raise ModelMissingError(
                f"{key}.path = {sub.path!r} does not exist and {key}.bootstrap is false "
                f"(point {key}.path at {_INIT_MARKERS[key][1]}, or set {key}.bootstrap=true)"
            )
        build(sub.tiny, sub.path)
