"""The config's dtype names ("float32", "bfloat16", "float16") as torch dtypes, in one place."""

from __future__ import annotations

DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is an error listing the known ones."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}: must be one of {list(DTYPE_NAMES)}")
    return getattr(torch, name)
