"""A confirmatory test set: real photographs that installed packages ship and that no recipe was chosen on.

Every recipe in ``docs/journal`` was trained on the 12 training photos of ``data.photos`` and chosen on its 4
held-out ones (``data.source: skimage``, seed 0), so none of those 16 can confirm a claim. These photos are in
no split of ``data.photos`` and no journal entry names them (``docs/test_photos.md`` has the survey, the
rejected candidates and the licences). ``data.eval_source: confirmatory`` evaluates on them
(``data.dataset.list_source``); the training split then is all of ``data.source``.

Files are read where the package installed them, found through the package's installed metadata
(``importlib.metadata``: nothing is imported, no path is hard-coded). A package that is not installed gives
a path that does not exist, which ``PairDataset`` skips with one warning, like any missing file. ``sha256``
pins each file's content (a package upgrade that changed a photo would fail ``tests/test_test_photos.py``).

Tags follow ``data.photos``: lowercase single words, each a whole word of the ``rough`` caption.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

SOURCE_NAME = "confirmatory"  # the data.source / data.eval_source name of this set

_PYIQA_LICENCE = ("PolyForm-Noncommercial-1.0.0: pyiqa's own licence (pyiqa-0.1.16.dist-info/METADATA "
                  "'License-Expression'; dist-info/licenses/LICENSE), the only licence on disk for these files; "
                  "the photo is from the Kodak Lossless True Color Image Suite, a 512x384 TID2013 reference "
                  "image (its pyiqa README: datasets are 'for academic, research, and educational purposes')")


@dataclass(frozen=True)
class ConfirmatoryPhoto:
    name: str  # image id
    package: str  # the distribution that installs the file
    file: str  # path relative to that distribution's install root (site-packages)
    tags: tuple[str, ...]  # content tags (whole lowercase words of the rough caption)
    rough: str  # one-sentence caption, in the style of data.photos' rough captions
    licence: str  # the licence and where it is stated
    sha256: str  # first 16 hex digits of the file's sha256


def _photo(name: str, package: str, file: str, tags: str, rough: str, licence: str,
           sha256: str) -> ConfirmatoryPhoto:
    return ConfirmatoryPhoto(name, package, file, tuple(tags.split()), rough, licence, sha256)


CONFIRMATORY_PHOTOS: tuple[ConfirmatoryPhoto, ...] = (
    _photo(
        "grace_hopper", "matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "woman officer cap glasses uniform flag",
        "A portrait of an elderly woman officer in a navy cap, glasses and a dark uniform in front of a flag.",
        "public domain: an official US Navy portrait, a work of the US federal government; on disk the "
        "JPEG comment names its source, 'File source: http://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg', "
        "where it is marked public domain; shipped as matplotlib sample data (matplotlib's LICENSE, PSF-style)",
        "a8ca6d734765703b",
    ),
    _photo(
        "kodim03_caps", "pyiqa", "ResultsCalibra/ref_dir/I03.bmp",
        "caps wall sky shadows",
        "Bright yellow, orange, green and pink caps hang on a wooden wall with their shadows under a grey sky.",
        _PYIQA_LICENCE, "28441215ca5b6358",
    ),
    _photo(
        "kodim04_girl", "pyiqa", "ResultsCalibra/ref_dir/I04.bmp",
        "woman face hat eyes hair",
        "A close-up of a smiling young woman's face with blue eyes and blond hair under a red hat.",
        _PYIQA_LICENCE, "c8500941a30397bc",
    ),
    _photo(
        "kodim06_boat", "pyiqa", "ResultsCalibra/ref_dir/I06.bmp",
        "boat sea mast shore trees",
        "An old sailing boat with a tall mast lies on a green sea, with a low shore and trees behind.",
        _PYIQA_LICENCE, "445c2c0fcb47898e",
    ),
    _photo(
        "kodim08_houses", "pyiqa", "ResultsCalibra/ref_dir/I08.bmp",
        "houses roofs windows shutters street",
        "A row of old half-timbered houses with steep tiled roofs, many windows and shutters along a street.",
        _PYIQA_LICENCE, "b5d6738ece811f45",
    ),
    _photo(
        "kodim19_lighthouse", "pyiqa", "ResultsCalibra/ref_dir/I19.bmp",
        "lighthouse fence house lifebuoy grass",
        "A white lighthouse and a house behind a white picket fence with a lifebuoy, on grass under a cloudy sky.",
        _PYIQA_LICENCE, "b8a2ede827d8db21",
    ),
)
CONFIRMATORY_BY_NAME: dict[str, ConfirmatoryPhoto] = {p.name: p for p in CONFIRMATORY_PHOTOS}


def confirmatory_path(name: str) -> Path:
    """Where the photo lies; a path that does not exist when its package is not installed."""
    try:
        info = CONFIRMATORY_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown confirmatory photo {name!r}; known: {sorted(CONFIRMATORY_BY_NAME)}") from None
    try:
        return Path(importlib.metadata.distribution(info.package).locate_file(info.file))
    except importlib.metadata.PackageNotFoundError:
        return Path(f"<{info.package} not installed>") / info.file
