"""Shared by the model tools (``tools.eval``, ``tools.infer``) and the probes (``lab.reward_probe``,
``lab.gain_probe``): find a trained model from a ``--checkpoint`` argument, build an in-process ChainSampler
from it (no Ray: one process, the same engines and pipeline the rollout actors use), and run the tool so that a
user's error is one line and exit code 2.

``--checkpoint`` may name
  * an export directory: ``policy/`` (HF Qwen2.5-VL) + ``diffusion/`` (diffusers SR pipeline);
  * a step directory ``.../checkpoints/step_NNNNNN`` (uses its ``export/``; must be complete);
  * a run's checkpoints root ``runs/<name>/checkpoints`` (the latest complete step), or the run directory.

The config (chain scales, token budget, denoising steps, rewards, data) defaults to the run's own
``config.yaml`` when the checkpoint sits in a run directory, so a model is evaluated the way it was trained.
Real LR images of any size go through ``fit_lr`` (downscale to ``--max-side``, pad to the SR model's size
multiple) and ``crop_output`` (undo the padding on each stage image).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from core.checkpoint import CheckpointError, latest_complete, verify_checkpoint
from core.config import ConfigError, ExperimentConfig, load_config
from core.dtypes import torch_dtype
from core.env import REPO_ROOT

log = logging.getLogger("tools.inference")
DEFAULT_CONFIG = REPO_ROOT / "configs" / "grpo_local.yaml"
ENGINES = ("vllm", "hf")


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the exported models of a ``--checkpoint`` argument are."""

    argument: str  # what the user passed
    export: Path  # holds policy/ and diffusion/
    policy: Path
    diffusion: Path
    step_dir: Optional[Path] = None  # the step_N directory, when the export is inside one
    run_config: Optional[Path] = None  # runs/<name>/config.yaml, when the checkpoint is inside a run

    @property
    def step(self) -> Optional[int]:
        return int(self.step_dir.name.split("_")[1]) if self.step_dir is not None else None


def _is_export(path: Path) -> bool:
    return (path / "policy").is_dir() and (path / "diffusion").is_dir()


def _check_export(export: Path, argument: str) -> None:
    problems = []
    if not (export / "policy" / "config.json").is_file():
        problems.append(f"{export / 'policy' / 'config.json'} is missing")
    if not (export / "diffusion" / "model_index.json").is_file():
        problems.append(f"{export / 'diffusion' / 'model_index.json'} is missing")
    if problems:
        raise CheckpointError(f"--checkpoint {argument}: export {export} is incomplete: {'; '.join(problems)}")


def resolve_checkpoint(argument: str | os.PathLike) -> ResolvedCheckpoint:
    """A step dir, an export dir, a checkpoints root or a run dir -> the export to load.

    Raises CheckpointError naming the path and what is wrong with it.
    """
    arg = str(argument)
    path = Path(arg).expanduser()
    if not path.exists():
        raise CheckpointError(f"--checkpoint {arg}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {arg}: not a directory")
    step_dir: Optional[Path] = None
    if _is_export(path):
        export = path
        if path.name == "export" and path.parent.name.startswith("step_"):
            step_dir = path.parent
    elif path.name.startswith("step_") or (path / "COMPLETE").exists():
        verify_checkpoint(path)  # an incomplete step may be half written: refuse it, saying why
        step_dir, export = path, path / "export"
        if not _is_export(export):
            raise CheckpointError(f"--checkpoint {arg}: step directory has no export/ with policy/ and diffusion/")
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        step_dir = latest_complete(root)
        if step_dir is None:
            raise CheckpointError(
                f"--checkpoint {arg}: not an export (policy/ + diffusion/), not a step_N directory, and no "
                f"complete step_N checkpoint under {root}")
        export = step_dir / "export"
        if not _is_export(export):
            raise CheckpointError(f"--checkpoint {arg}: latest complete checkpoint {step_dir} has no export/ "
                                  "with policy/ and diffusion/")
    _check_export(export, arg)
    run_config = None
    if step_dir is not None and step_dir.parent.name == "checkpoints":
        candidate = step_dir.parent.parent / "config.yaml"
        run_config = candidate if candidate.is_file() else None
    return ResolvedCheckpoint(arg, export.resolve(), (export / "policy").resolve(),
                              (export / "diffusion").resolve(), step_dir, run_config)


def load_inference_config(config: Optional[str], ckpt: ResolvedCheckpoint,
                          overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, Path]:
    """``--config`` if given, else the run's config.yaml, else configs/grpo_local.yaml, plus ``key=value``
    overrides; model paths are pointed at the checkpoint's export (and never bootstrapped: a missing model is
    an error, not a new one)."""
    path = Path(config) if config else (ckpt.run_config or DEFAULT_CONFIG)
    cfg = load_config(path, overrides)
    cfg = replace(
        cfg,
        policy=replace(cfg.policy, path=str(ckpt.policy), bootstrap=False, init_from=None),
        diffusion=replace(cfg.diffusion, path=str(ckpt.diffusion), bootstrap=False, init_from=None),
    )
    return cfg, path


class UsageError(ValueError):
    """A bad argument, or an input the tool cannot use; the message names the flag (or key) and the value."""


def check_at_least(flag: str, value: float, low: float) -> None:
    if not value >= low:  # also refuses NaN
        raise UsageError(f"{flag} {value} must be >= {low}")


def run_tool(prog: str, work: Callable[[], int]) -> int:
    """The main of every model tool: ``work`` checks its arguments, computes, then writes; a user's error (a bad
    argument, checkpoint, config or data source, a missing file) prints ``prog: message`` and returns 2 before
    anything is written. Any other exception is a bug and keeps its traceback."""
    from data.dataset import DataSourceError  # here, not at the top: cv2 stays out of ``--help``

    try:
        return work()
    except (UsageError, CheckpointError, ConfigError, DataSourceError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


def model_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser both tools start from: the checkpoint, the config and its overrides, the engine, decoding,
    seed, device and threads."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--checkpoint", required=True,
                   help="a step_N dir, an export dir (policy/ + diffusion/), or a run's checkpoints root (latest)")
    p.add_argument("--config", default=None, help="default: the run's config.yaml, else configs/grpo_local.yaml")
    p.add_argument("--engine", default="vllm", choices=ENGINES,
                   help="text engine (vllm falls back to hf when it is not usable)")
    p.add_argument("--greedy", action="store_true", help="greedy text decoding (temperature 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; no effect on GPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. diffusion.num_steps=20 chain.max_stage_tokens=64")
    return p


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_sampler(cfg: ExperimentConfig, engine: str = "vllm", greedy: bool = False,
                  device: Optional[str] = None, seed: int = 0):
    """An in-process ChainSampler on ``cfg.policy.path`` / ``cfg.diffusion.path``.

    ``engine="vllm"`` falls back to the HF engine, with one warning saying why, when vLLM is not installed or
    cannot start (e.g. a GPU machine without vllm): evaluation must not depend on the serving stack.
    ``sampler.engine_name`` says which engine runs.
    ``greedy``: text at temperature 0 (the paper's evaluation decodes text greedily); the SR sampler stays
    stochastic (eta > 0 is required by the pipeline) but is seeded per image, so runs are reproducible.
    """
    from actors.chain_sampler import ChainSampler
    from actors.engines import build_text_engine
    from actors.text_engine import TextEngineSpec
    from models.sr_pipeline import SRPipeline

    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: must be one of {ENGINES}")
    device = device or default_device()
    sampling = cfg.rollout.sampling
    if greedy:
        sampling = replace(sampling, temperature=0.0, top_p=1.0, top_k=-1)
    spec = TextEngineSpec(cfg.policy.path, sampling, cfg.chain.max_stage_tokens, vllm=cfg.rollout.vllm,
                          dtype=cfg.policy.dtype, device=device, seed=seed)
    if engine == "vllm":
        try:
            text = build_text_engine("vllm", spec)
        except Exception as exc:  # noqa: BLE001 - ImportError, or an engine that cannot start here
            print(f"warning: the vLLM engine is not usable ({type(exc).__name__}: {str(exc)[:200]}); "
                  "using the HF engine instead", file=sys.stderr)
            engine = "hf"
    if engine == "hf":
        text = build_text_engine("hf", spec)
    pipeline = SRPipeline.from_pretrained(cfg.diffusion.path).to(device, torch_dtype(cfg.diffusion.dtype))
    sampler = ChainSampler(text, pipeline, cfg.chain, cfg.diffusion, sampling=sampling)
    sampler.engine_name = engine
    return sampler


def lr_multiple(pipeline, scales: dict[str, int]) -> int:
    """The smallest m such that every LR side that is a multiple of m gives stage sizes the UNet accepts.

    Stage sizes are LR * scale and must be multiples of ``f * 2^(levels - 1)`` (``SRPipeline.latent_size``).
    """
    need = pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    m = 1
    for s in scales.values():
        m = math.lcm(m, need // math.gcd(need, s))
    return m



@dataclass(frozen=True)
class Fitted:
    """An LR image made acceptable to the chain, and how to undo it on the outputs."""

    lr: np.ndarray  # (h', w', 3) uint8, sides multiples of the pipeline's multiple
    size: tuple[int, int]  # (h, w) of the image the outputs are cropped back to (after --max-side)
    notes: tuple[str, ...]  # what was done, for the user


def fit_lr(image: np.ndarray, multiple: int, max_side: Optional[int] = None) -> Fitted:
    """Downscale so the longer side is at most ``max_side`` (area filter), then reflect-pad the bottom and
    right to multiples of ``multiple``. Padding (not cropping) keeps every input pixel; ``crop_output``
    removes the padded border from each stage image, so the final image is exactly ``scale x`` the
    (downscaled) input.
    """
    import cv2

    notes = []
    h, w = image.shape[:2]
    if max_side is not None and max(h, w) > max_side:
        f = max_side / max(h, w)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        notes.append(f"downscaled {w}x{h} -> {nw}x{nh} (--max-side {max_side})")
        h, w = nh, nw
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        # reflect needs the image to be larger than the pad; "edge" is the fallback for tiny images
        mode = "reflect" if ph < h and pw < w else "edge"
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)
        notes.append(f"padded {w}x{h} -> {w + pw}x{h + ph} ({mode}; sides must be multiples of {multiple}), "
                     "outputs cropped back")
    return Fitted(np.array(image, order="C"), (h, w), tuple(notes))  # a writable copy (PIL arrays are not)


def crop_output(image: np.ndarray, fitted: Fitted, scale: int) -> np.ndarray:
    """A stage image at ``scale`` x the fitted LR -> the part that covers the unpadded input."""
    h, w = fitted.size
    return image[: h * scale, : w * scale]
