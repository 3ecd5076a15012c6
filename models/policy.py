"""Loading the policy: a Qwen2.5-VL model and its processor from an HF directory (local paths only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from core.dtypes import torch_dtype

PathLike = Union[str, os.PathLike]


def load_policy(path: PathLike, dtype: str = "float32", device: str = "cpu"):
    """``Qwen2_5_VLForConditionalGeneration`` from an HF directory, in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    _require_dir(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch_dtype(dtype))
    return model.to(device).eval()


def load_processor(path: PathLike):
    """The ``Qwen2_5_VLProcessor`` (tokenizer + image processor) saved with the policy."""
    from transformers import AutoProcessor

    _require_dir(path)
    return AutoProcessor.from_pretrained(str(path))


def _require_dir(path: PathLike) -> None:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"no HF model at {path} (config.json missing); build the tiny one with `python -m tools.bootstrap`"
        )
