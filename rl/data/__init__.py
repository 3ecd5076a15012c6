"""Data: image sources and the default photo set, safe image I/O, and the Real-ESRGAN degradation model.

Everything here is pure (numpy / OpenCV / Pillow; no Ray, no torch ops): ``PairDataset.sample(cursor)``
returns an ``rl.records.Sample`` whose LR image and degradation labels are a deterministic function of the
config and the cursor.
"""

from rl.data.dataset import DataSourceError, ImageEntry, PairDataset, list_source, split_entries
from rl.data.degradations import (
    ITEMS,
    LEVEL_RULES,
    apply_params,
    degrade,
    levels_from_measures,
    sample_params,
)
from rl.data.images import BadImageError, load_rgb, save_png, to_rgb_array
from rl.data.photos import PHOTOS, PHOTOS_BY_NAME, PhotoInfo, load_photo

__all__ = [
    "ITEMS",
    "LEVEL_RULES",
    "PHOTOS",
    "PHOTOS_BY_NAME",
    "BadImageError",
    "DataSourceError",
    "ImageEntry",
    "PairDataset",
    "PhotoInfo",
    "apply_params",
    "degrade",
    "levels_from_measures",
    "list_source",
    "load_photo",
    "load_rgb",
    "sample_params",
    "save_png",
    "split_entries",
    "to_rgb_array",
]
