"""Super-resolve a folder of real low-resolution images with a trained checkpoint (no Ray, one process).

    python -m tools.infer --checkpoint runs/grpo_local/checkpoints --input photos/ --output sr/
                          [--engine vllm|hf] [--config FILE] [--max-side N] [--greedy] [--seed S]
                          [key=value ...]

Every image file of ``--input`` (not recursive; a single file works too) is taken as a real LR image: no
synthesis, no HR. For each one the whole VLCoT chain runs and ``OUTPUT/<stem>/`` gets

    sr.png      the final image (scale x the input, chain.final_scale: 4 for the paper's models)
    rough.png   the rough stage image (rough_scale x), middle.png the middle one (middle_scale x)
    chain.txt   the chain text (images shown as <|image|>), then the size notes

The SR model needs sides that are multiples of its downsampling factor (8 for the tiny models): other inputs
are reflect-padded and every output is cropped back, so the outputs are exactly scale x the input;
``--max-side`` (default 512; 0: never) first downscales inputs whose longer side exceeds it (both are noted on
the console and in chain.txt). A file that cannot be read as an image is reported in one line naming it and skipped. Exit code
0 when at least one image was super-resolved, 1 when none was, 2 for a bad argument (checkpoint, config,
folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger("tools.infer")
# An ordinary photo (4000 px) would become a 16000 px (256 MP) 4x job that the kernel kills, ending the batch: inputs
# are downscaled to this longer side first (a 2048 px, 4 MP output), unless --max-side says otherwise (0: never).
DEFAULT_MAX_SIDE = 512


@dataclass
class Summary:
    """What happened to each input file."""

    done: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, why): not readable as an image
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, why): the chain raised

    def line(self, seconds: float) -> str:
        parts = [f"{len(self.done)} super-resolved"]
        parts.append(f"{len(self.bad)} skipped (unreadable)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return f"tools.infer: {', '.join(parts)} in {seconds:.1f} s"


def list_inputs(path: Path) -> list[Path]:
    """Image files (by suffix) of a folder, sorted, or the one file given."""
    from core.images import IMAGE_SUFFIXES

    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or directory")
    files = sorted(f for f in path.iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--input {path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def output_names(files: list[Path]) -> list[str]:
    """One output folder name per input: the stem, or the file name when two inputs share a stem."""
    stems = [f.stem for f in files]
    return [f.stem if stems.count(f.stem) == 1 else f.name for f in files]


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from core.env import configure_process
    from core.images import BadImageError, load_rgb, save_png
    from core.records import Sample
    from tools.inference import (
        build_sampler,
        crop_output,
        fit_lr,
        load_inference_config,
        lr_multiple,
        resolve_checkpoint,
    )

    configure_process(args.threads)  # CPU: torch threads capped (oversubscribed shared cores ran ~20x slower)
    start = time.perf_counter()
    ckpt = resolve_checkpoint(args.checkpoint)
    cfg, _ = load_inference_config(args.config, ckpt, args.overrides)
    files = list_inputs(Path(args.input))
    names = output_names(files)
    out_root = Path(args.output)
    out_root.mkdir(parents=True, exist_ok=True)
    sampler = build_sampler(cfg, args.engine, args.greedy, args.device, seed=args.seed)
    multiple = lr_multiple(sampler.pipeline, sampler.scales)
    summary = Summary()
    bar = tqdm(list(zip(files, names)), desc="tools.infer", unit="img", dynamic_ncols=True, file=sys.stderr)
    for index, (path, name) in enumerate(bar):
        try:
            image = load_rgb(path)
        except BadImageError as exc:
            bar.write(f"skipped {path}: {exc.reason}", file=sys.stderr)
            summary.bad.append((str(path), exc.reason))
            continue
        fitted = fit_lr(image, multiple, args.max_side or None)
        for note in fitted.notes:
            bar.write(f"note: {path.name}: {note}", file=sys.stderr)
        sample = Sample(prompt_id=index, image_id=name, lr=fitted.lr, hr=None, tags=(), degradation=None)
        try:
            with torch.no_grad():
                (rollout,) = sampler.sample([sample], group_size=1, seed=args.seed)
        except Exception as exc:  # noqa: BLE001 - one image must not end the batch; said, counted, exit code
            bar.write(f"failed {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            summary.failed.append((str(path), f"{type(exc).__name__}: {exc}"))
            continue
        target = out_root / name
        for stage, file_name in (("final", "sr.png"), ("rough", "rough.png"), ("middle", "middle.png")):
            save_png(target / file_name, crop_output(rollout.images[stage], fitted, sampler.scales[stage]))
        notes = "".join(f"\n# {n}" for n in fitted.notes)
        (target / "chain.txt").write_text(rollout.text + "\n" + (notes.lstrip("\n") + "\n" if notes else ""),
                                          encoding="utf-8")
        summary.done.append(str(path))
    bar.close()
    print(summary.line(time.perf_counter() - start) + f"; outputs in {out_root}", file=sys.stderr)
    return 0 if summary.done else 1


def build_parser() -> argparse.ArgumentParser:
    from tools.inference import model_arguments

    p = model_arguments("python -m tools.infer", __doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a folder of LR images (or one image file)")
    p.add_argument("--output", required=True, help="writes OUTPUT/<stem>/{sr,rough,middle}.png and chain.txt")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help=f"downscale inputs whose longer side exceeds this many pixels before SR (default "
                        f"{DEFAULT_MAX_SIDE}: a 4x output of at most {4 * DEFAULT_MAX_SIDE} px a side; 0: never)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from tools.inference import check_at_least, run_tool

    def work() -> int:
        if args.max_side:
            check_at_least("--max-side", args.max_side, 8)
        return run(args)

    return run_tool("tools.infer", work)


if __name__ == "__main__":
    sys.exit(main())
