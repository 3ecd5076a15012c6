"""``python -m tools.bootstrap OUT_DIR [--config configs/grpo_local.yaml] [--force]``: build the tiny random
models.

Writes ``OUT_DIR/policy`` (Qwen2.5-VL, HF format) and ``OUT_DIR/diffusion`` (diffusers layout) from the config's
``policy.tiny`` / ``diffusion.tiny``, offline, in seconds. A run builds them itself when its ``policy.path`` /
``diffusion.path`` are missing and ``bootstrap: true`` (``models.bootstrap.ensure_models``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from core.config import ConfigError, load_config
from models.bootstrap import build_all

DEFAULT_CONFIG = "configs/grpo_local.yaml"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="writes OUT_DIR/policy and OUT_DIR/diffusion")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="takes policy.tiny and diffusion.tiny from here")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    for name, path in build_all(args.out_dir, cfg.policy.tiny, cfg.diffusion.tiny, force=args.force).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
