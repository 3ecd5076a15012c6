"""Images in one format everywhere, (H, W, 3) uint8 RGB: safe file I/O (any readable picture, or a
``BadImageError`` that names the file) and the conversions to what models take (tensors, PIL).

Conversions are explicit because each has a right answer for SR data: transparency is composited on white
(as the paper's tokenizer whitens RGBA), 16-bit samples are rescaled (not truncated) to 8 bit, palette and
grey images are expanded, and EXIF orientation is applied so tags and pixels agree.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Union

import cv2
import numpy as np
from PIL import Image, ImageOps

ImageLike = Union[Image.Image, np.ndarray]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


class BadImageError(ValueError):
    """A file that cannot be used as an image; ``reason`` is one short phrase for logs and stats."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def to_rgb_array(image: np.ndarray) -> np.ndarray:
    """An in-memory image -> (H, W, 3) uint8.

    Accepts (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) (alpha composited on white) arrays of bool, uint8,
    uint16 (rescaled by 255/65535) or float in [0, 1]. Raises ValueError for anything else.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"expected an (H, W[, 1|3|4]) image, got shape {np.shape(image)}")
    if a.dtype == bool:
        f = a.astype(np.float32)
    elif a.dtype == np.uint8:
        f = None
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        f = np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0)
    else:
        raise ValueError(f"unsupported image dtype {a.dtype}")
    if f is not None:
        a = np.rint(f * 255.0).astype(np.uint8)
    if a.shape[2] == 4:  # composite on white: out = rgb * alpha + 255 * (1 - alpha)
        alpha = a[..., 3:].astype(np.float32) / 255.0
        a = np.rint(a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "L"):
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode.startswith("I;16"):  # 16-bit grey PNG / TIFF
        return np.asarray(im).astype(np.uint16)
    if mode == "I":  # 32-bit integer; in practice 16-bit data (older Pillow reads 16-bit PNG as I)
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"32-bit integer samples outside 0..65535 (min {a.min()}, max {a.max()})")
        return a.astype(np.uint16)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        return a / 255.0 if a.max() > 1.0 else a
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        im = im.convert("RGBA")
    else:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        im = im.convert("RGB")
    return np.asarray(im)


def _read_png16_color(path: Path) -> np.ndarray | None:
    """16-bit colour PNG as uint16 RGB(A), or None for any other file.

    Pillow reads 16-bit colour PNG as 8-bit by dropping the low byte (a downward bias of up to one level);
    OpenCV keeps all 16 bits, so ``to_rgb_array`` can round 65535 -> 255 properly.
    """
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[24] != 16 or head[25] not in (2, 6):
        return None
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None or a.dtype != np.uint16 or a.ndim != 3:
        return None  # let Pillow try (and report)
    return a[..., [2, 1, 0, 3]] if a.shape[2] == 4 else a[..., ::-1]


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB. Raises ``BadImageError(path, reason)`` when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: truncated and corrupt data fail here, inside the try
                array = _read_png16_color(path) if im.format == "PNG" and im.mode in ("RGB", "RGBA") else None
                if array is None:
                    with contextlib.suppress(Exception):  # a broken EXIF block must not lose a good image
                        im = ImageOps.exif_transpose(im)
                    array = _pil_to_array(im)
        return to_rgb_array(array)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(path, f"too many pixels ({exc})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise BadImageError(path, f"cannot decode ({type(exc).__name__}: {exc})") from None


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an (H, W[, 3]) uint8 image as PNG, atomically (a reader never sees half a file)."""
    path = Path(path)
    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"save_png({path}): expected (H, W[, 3|4]) uint8, got {a.shape} {a.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(a).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------ conversions
def to_tensor(images: np.ndarray, low: float = 0.0):
    """uint8 (H, W, 3) -> float32 (3, H, W), or a stack (N, H, W, 3) -> (N, 3, H, W), scaled to [low, 1]:
    low 0 for image metrics (pyiqa), -1 for the diffusion model."""
    import torch

    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) or (N, H, W, 3) images, got {a.dtype} {a.shape}")
    x = torch.from_numpy(np.ascontiguousarray(a)).movedim(-1, -3).float()
    return x / (255.0 / (1.0 - low)) + low  # exact for low 0 (x / 255) and -1 (x / 127.5 - 1)


def to_pil(image: ImageLike) -> Image.Image:
    """uint8 HWC array (the records' image format) or PIL -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be a (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr, "RGB")
