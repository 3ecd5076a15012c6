"""Does the SR model use what it is told? Its output change when a chain's understanding texts are swapped for
another photo's, and (a stage-aware model) when it is told another stage.

    python -m lab.text_use_probe --checkpoint runs/sft_local/checkpoints/step_000300 [--num 32] [--split eval]

Every stage is sampled from the cold start's inputs (the LR image for the rough stage, the HR's downscale to the
stage before for the others) with one noise per image three ways: the photo's own understanding text of that stage,
the next photo's (another photo's content), and its own text under the label of another stage. Per stage it prints
the mean absolute pixel change (0-255) and the PSNR change against the stage's target; a model that ignores its
text changes by ~0 (the issue's "another crop's caption changes PSNR by 0.000 dB").

Writes OUT/text_use.json (default OUT: ./text_use_probe/<checkpoint export's parent folder name>).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class StageUse:
    stage: str
    psnr_own: float  # dB against the stage's target, own texts
    text_pixel_change: float  # mean |own - swapped text| in grey levels (0-255)
    text_psnr_change: float  # PSNR(own) - PSNR(another photo's text), dB, mean over images
    stage_label: str  # the other stage it was told ("" for a stage-blind model)
    stage_pixel_change: float  # mean |own - told another stage| in grey levels (0 for a stage-blind model)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 images in dB (capped at 100 for equal images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def grey_change(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean absolute difference of paired uint8 images, in grey levels (0-255), averaged over the pairs."""
    return float(np.mean([np.abs(x.astype(np.float64) - y).mean() for x, y in zip(a, b)]))


def _sample(pipe, conditions, size, texts, stage, cfg, seed) -> list[np.ndarray]:
    from models.sr_pipeline import StepSettings

    generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(conditions))]
    images, _ = pipe.sample(conditions, size, texts, num_steps=cfg.diffusion.num_steps, generator=generators,
                            stage=stage, settings=StepSettings.from_config(cfg.diffusion))
    return images


def probe(args: argparse.Namespace) -> dict:
    from core.chain import STAGES, stage_scales, stage_sizes
    from core.env import configure_process
    from data.sft_targets import CONDITION_OF, stage_targets, understanding_texts
    from models.sr_pipeline import SRPipeline
    from tools.eval import load_samples
    from tools.inference import UsageError, default_device, load_inference_config, resolve_checkpoint

    configure_process(args.threads)
    ckpt = resolve_checkpoint(args.checkpoint)
    cfg, _ = load_inference_config(args.config, ckpt)
    samples, _ = load_samples(cfg, args.data, args.split, args.num, False)
    if len({s.image_id for s in samples}) < 2:
        raise UsageError(f"--num {args.num}: the texts are swapped between photos, so at least 2 photos are needed")
    scales = stage_scales(cfg.chain)
    pipe = SRPipeline.from_pretrained(str(ckpt.diffusion)).to(args.device or default_device())
    known = list(pipe.stages)
    texts = [understanding_texts(s.image_id, s.tags) for s in samples]
    other = [next(j for j in [*range(i + 1, len(samples)), *range(i)] if samples[j].image_id != s.image_id)
             for i, s in enumerate(samples)]  # the next sample of another photo
    targets = [stage_targets(s.hr, s.lr.shape[:2], scales) for s in samples]
    size = stage_sizes(samples[0].lr.shape[:2], scales)
    rows = []
    for k, stage in enumerate(STAGES):
        conditions = [s.lr if CONDITION_OF[stage] == "lr" else t[CONDITION_OF[stage]] for s, t in zip(samples, targets)]
        own = _sample(pipe, conditions, size[stage], [t[stage] for t in texts], stage, cfg, args.seed)
        swapped = _sample(pipe, conditions, size[stage], [texts[j][stage] for j in other], stage, cfg, args.seed)
        told = STAGES[(k + 1) % len(STAGES)] if known else ""
        relabelled = _sample(pipe, conditions, size[stage], [t[stage] for t in texts], told, cfg, args.seed) \
            if known else own
        want = [t[stage] for t in targets]
        rows.append(StageUse(
            stage, float(np.mean([psnr(a, w) for a, w in zip(own, want)])), grey_change(own, swapped),
            float(np.mean([psnr(a, w) - psnr(b, w) for a, b, w in zip(own, swapped, want)])), told,
            grey_change(own, relabelled)))
    return {"checkpoint": str(ckpt.export), "num_images": len(samples), "stage_aware": bool(known),
            "stages": [asdict(r) for r in rows]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab.text_use_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a step_N dir, an export, or a run")
    p.add_argument("--config", default=None, help="default: the checkpoint's run config, else configs/grpo_local.yaml")
    p.add_argument("--data", default="skimage", help="skimage, an image folder, or a .jsonl manifest (with HR)")
    p.add_argument("--split", default="eval", choices=("eval", "train", "all"))
    p.add_argument("--num", type=int, default=32, help="number of images (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default=None, help="output folder (default: ./text_use_probe/<run or step name>)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tools.inference import check_at_least, run_tool

    def work() -> int:
        check_at_least("--num", args.num, 2)
        report = probe(args)
        out = Path(args.out) if args.out else Path("text_use_probe") / Path(report["checkpoint"]).parent.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "text_use.json").write_text(json.dumps(report, indent=2))
        for r in report["stages"]:
            told = f"; told {r['stage_label']}: {r['stage_pixel_change']:.2f} grey levels" if r["stage_label"] else ""
            print(f"{r['stage']:>6}: PSNR {r['psnr_own']:.2f} dB; another photo's text: {r['text_pixel_change']:.2f} "
                  f"grey levels, {r['text_psnr_change']:+.3f} dB{told}")
        return 0

    return run_tool("lab.text_use_probe", work)


if __name__ == "__main__":
    sys.exit(main())
