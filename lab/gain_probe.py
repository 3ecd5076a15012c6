"""How a trained SR model's detail differs from a reference's: its gain along the reference's detail, and the rest.

    python -m lab.gain_probe --checkpoint runs/NAME/checkpoints/step_000020 \
                             --reference runs/sft_local/checkpoints/step_000300/export [--num 32] [--split eval]

Both SR models sample every stage from the same inputs with the same noise: the degraded LR image for the rough
stage, the photograph's bicubic downscale to the stage before for the middle and final stages, one fixed prompt.
Per image, the model's sampled x_0 (for a residual model, its detail about the bicubic upsampling) is split into
s x the reference's plus a rest orthogonal to it: s is the gain GRPO's ``experimental.detail_gain_std`` explores, the
rest is the change that is not a gain (new noise patterns). ``lab.reward_probe`` says what each gain is worth to the
reward.

Writes OUT/gain.json (default OUT: ./gain_probe/<checkpoint export's parent folder name>) and prints one line a stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

PROMPT = "a photograph"


@dataclass(frozen=True)
class StageGain:
    stage: str
    gain: float  # mean over images of s = <x, ref> / <ref, ref>
    gain_sd: float
    rest_share: float  # mean over images of |x - s ref|^2 / |x|^2: the share of the detail that is not a gain
    rms: float  # the model's x_0 rms
    reference_rms: float


def gain_and_rest(x: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (first dim): the gain s of ``x`` along ``reference`` and the share of ``x``'s energy off it.

    >>> ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> s, rest = gain_and_rest(torch.tensor([[1.3, 0.0], [1.0, 2.0]]), ref)
    >>> [round(v, 3) for v in s.tolist()], [round(v, 3) for v in rest.tolist()]
    ([1.3, 1.0], [0.0, 0.2])
    """
    a, b = reference.flatten(1).double(), x.flatten(1).double()
    s = (a * b).sum(1) / (a * a).sum(1)
    rest = ((b - s[:, None] * a) ** 2).sum(1) / (b * b).sum(1)
    return s, rest


def stage_inputs(samples: Sequence, scales: dict[str, int], stage: str) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The conditioning images of ``stage`` and its output size: the LR for the rough stage, else the HR's bicubic
    downscale to the size of the stage before (so both models see the same, clean input)."""
    from PIL import Image

    from core.chain import STAGES, stage_sizes

    sizes = stage_sizes(samples[0].lr.shape[:2], scales)
    k = STAGES.index(stage)
    if k == 0:
        return [s.lr for s in samples], sizes[stage]
    h, w = sizes[STAGES[k - 1]]
    return [np.asarray(Image.fromarray(s.hr).resize((w, h), Image.BICUBIC)) for s in samples], sizes[stage]


def sampled_x0(pipe, conditions: list[np.ndarray], size: tuple[int, int], stage: str, cfg, seed: int) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(conditions))]
    from models.sr_pipeline import StepSettings

    _, traces = pipe.sample(conditions, size, [PROMPT] * len(conditions), num_steps=cfg.diffusion.num_steps,
                            generator=generators, stage=stage,
                            settings=StepSettings(eta=cfg.diffusion.eta, noise_level=cfg.diffusion.noise_level))
    return torch.stack([t.latents[-1] for t in traces])


def probe(args: argparse.Namespace) -> dict:
    from core.chain import STAGES, stage_scales
    from core.env import configure_process
    from models.sr_pipeline import SRPipeline
    from tools.eval import load_samples
    from tools.inference import UsageError, default_device, load_inference_config, resolve_checkpoint

    configure_process(args.threads)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UsageError(f"--stages {args.stages}: {unknown} not among {list(STAGES)}")
    ckpt, ref = resolve_checkpoint(args.checkpoint), resolve_checkpoint(args.reference)
    cfg, _ = load_inference_config(args.config, ckpt)
    samples, _ = load_samples(cfg, args.data, args.split, args.num, False)
    scales = stage_scales(cfg.chain)
    device = args.device or default_device()
    model, reference = (SRPipeline.from_pretrained(str(c.diffusion)).to(device) for c in (ckpt, ref))  # once each
    rows = []
    for stage in stages:
        conditions, size = stage_inputs(samples, scales, stage)
        x = sampled_x0(model, conditions, size, stage, cfg, args.seed)
        r = sampled_x0(reference, conditions, size, stage, cfg, args.seed)
        s, rest = gain_and_rest(x, r)
        rows.append(StageGain(stage, float(s.mean()), float(s.std()) if len(s) > 1 else 0.0, float(rest.mean()),
                              float(x.pow(2).mean().sqrt()), float(r.pow(2).mean().sqrt())))
    return {"checkpoint": str(ckpt.export), "reference": str(ref.export), "num_images": len(samples),
            "stages": [asdict(r) for r in rows]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab.gain_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the trained model: a step_N dir, an export, or a run")
    p.add_argument("--reference", required=True, help="the model it is measured against (e.g. the cold start)")
    p.add_argument("--config", default=None, help="default: the checkpoint's run config, else configs/grpo_local.yaml")
    p.add_argument("--data", default="skimage", help="skimage, an image folder, or a .jsonl manifest (with HR)")
    p.add_argument("--split", default="eval", choices=("eval", "train", "all"))
    p.add_argument("--num", type=int, default=32, help="number of images (default 32)")
    p.add_argument("--stages", default="rough,middle,final", help="comma-separated (default all three)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default=None, help="output folder (default: ./gain_probe/<run or step name>)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tools.inference import check_at_least, run_tool

    def work() -> int:
        check_at_least("--num", args.num, 1)
        report = probe(args)
        out = Path(args.out) if args.out else Path("gain_probe") / Path(report["checkpoint"]).parent.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "gain.json").write_text(json.dumps(report, indent=2))
        for r in report["stages"]:
            print(f"{r['stage']:>6}: gain {r['gain']:.3f} (sd {r['gain_sd']:.3f}), not a gain {r['rest_share']:.1%} "
                  f"of the detail's energy; rms {r['rms']:.4f} against {r['reference_rms']:.4f}")
        return 0

    return run_tool("lab.gain_probe", work)


if __name__ == "__main__":
    sys.exit(main())
