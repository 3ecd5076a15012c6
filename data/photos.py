"""The default dataset: real photographs that ship inside scikit-image's wheel, with hand-written labels.

Each photo has content ``tags`` (lowercase single words, each of which appears as a whole word in the rough
caption, so a perfect rough caption earns the full understanding reward) and ``captions`` at the three levels
of detail of the VLCoT chain (``core.chain.STAGES``: rough / middle / final), used by the cold-start SFT target
synthesis. Tags describe the whole photograph; a random crop may show only part of it.

Files are read straight from scikit-image's data folder (``skimage/data/*.png|jpg``, present offline in
scikit-image 0.25-0.26), never through ``skimage.data``'s pooch download path. Left out on purpose: ``cat``
(the same file as chelsea), ``horse`` (a binary silhouette), ``clock`` and ``cell`` (blurred), the motorcycle's
right view (a near-duplicate of the left one, it would leak across the train / held-out split), and the
synthetic images (logo, colorwheel, chessboard, phantom).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.images import load_rgb


@dataclass(frozen=True)
class PhotoInfo:
    name: str  # image id (scikit-image's name for it)
    file: str  # file name inside skimage/data
    tags: tuple[str, ...]  # ground-truth content tags (whole lowercase words)
    captions: dict[str, str]  # stage (rough | middle | final) -> caption, coarse to fine
    gray: bool = False  # the file is greyscale; load_photo returns it as RGB


def _photo(name: str, file: str, tags: str, rough: str, middle: str, final: str, gray: bool = False) -> PhotoInfo:
    return PhotoInfo(name, file, tuple(tags.split()), {"rough": rough, "middle": middle, "final": final}, gray)


PHOTOS: tuple[PhotoInfo, ...] = (
    _photo(
        "astronaut", "astronaut.png", "astronaut woman suit flag helmet shuttle",
        "A smiling woman astronaut in an orange suit poses beside a flag, a helmet and a model space shuttle.",
        "A portrait of a smiling woman astronaut with short brown hair in an orange flight suit with mission "
        "patches; an American flag hangs on the left, a model space shuttle stands on the right and a black "
        "helmet rests in the front.",
        "A studio portrait of a smiling astronaut with short light-brown hair, wearing an orange pressure suit "
        "with a silver neck ring, a round blue mission patch and a name tag. The red and white stripes and the "
        "stars of an American flag fill the left edge, a white model space shuttle with an orange fuel tank "
        "stands against a mottled grey backdrop on the right, and a glossy black helmet with a bright "
        "reflection sits in the lower right corner.",
    ),
    _photo(
        "chelsea", "chelsea.png", "cat face eyes nose whiskers fur",
        "A close-up of a tabby cat face with green eyes, a pink nose, white whiskers and striped fur.",
        "A close-up of a tabby cat looking to the left: large yellow-green eyes, a pink nose, long white "
        "whiskers and brown striped fur, in front of a blurred pale room.",
        "A close-up of a young tabby cat turned slightly to the left, with large yellow-green eyes and round "
        "black pupils, a small pink nose outlined in dark brown, long white whiskers fanning from its muzzle, "
        "and short brown fur with dark stripes on the forehead; the background is a soft, out-of-focus "
        "white and beige room.",
    ),
    _photo(
        "coffee", "coffee.png", "coffee cup saucer spoon table",
        "A cup of espresso coffee on a red saucer with a metal spoon, on a wooden table.",
        "A top-down view of a red and white cup of espresso coffee with light crema, standing on a red "
        "saucer with a small silver spoon, on a worn wooden table.",
        "A view from above of a small espresso cup, red outside and white inside, filled with coffee under "
        "a smooth tan crema; it stands on a glossy dark-red saucer next to a shiny silver spoon that "
        "reflects the light, all on a scratched, warm brown wooden table in dim light.",
    ),
    _photo(
        "rocket", "rocket.jpg", "rocket towers sky lights launch",
        "A white rocket stands between tall towers on a launch pad under a dark blue sky with bright lights.",
        "A white rocket stands upright on its launch pad at dusk between two steel lattice towers and two "
        "thin masts, with star-shaped lights glowing at the base under a deep blue sky.",
        "At dusk a slender white rocket with a dark logo near its nose stands on a launch pad, flanked by "
        "two thin lightning masts and, at the edges, two tall steel lattice towers; bright floodlights "
        "with star-shaped flares glow along the horizon, low grey clouds lie over the distant land and the deep blue sky "
        "darkens towards the top.",
    ),
    _photo(
        "motorcycle", "motorcycle_left.png", "motorcycle garage seat wheels shelves boxes",
        "A red motorcycle with a black seat and spoked wheels stands in a garage in front of shelves with "
        "boxes.",
        "A red motorcycle with a black seat, a chrome engine and spoked wheels is parked on a concrete "
        "floor of a garage, in front of metal shelves with cardboard boxes and a wooden bench.",
        "A red Yamaha motorcycle with a black quilted seat, a round headlight, a silver V-twin engine and "
        "spoked wheels with black tyres stands on its kickstand on a grey concrete garage floor; behind it "
        "are metal shelves holding cardboard boxes and a red storage bin, a wooden bench on the left "
        "and a bicycle wheel at the left edge.",
    ),
    _photo(
        "hubble_deep_field", "hubble_deep_field.jpg", "galaxies stars space",
        "A deep space view full of small galaxies and stars on a black background.",
        "A Hubble telescope view of deep space: hundreds of small galaxies in white, orange and blue, "
        "and a few bright stars scattered on a black background.",
        "A Hubble deep-field view of space: hundreds of distant galaxies, some as spirals, some as orange "
        "or yellow ellipses and many as faint blue or red dots, scattered over a black background, with a "
        "few bright stars showing sharp diffraction spikes.",
    ),
    _photo(
        "retina", "retina.jpg", "retina fundus vessels disc",
        "A fundus photograph of a human retina: an orange disc crossed by dark red blood vessels.",
        "A round fundus photograph of a human retina, orange-red, with dark red blood vessels branching "
        "from the bright optic disc on the left towards the darker centre, on a black background.",
        "A circular fundus photograph of a human retina on a black background: an orange-red surface with "
        "dark red blood vessels that branch out from a bright yellow optic disc on the left, a darker spot "
        "at the centre of the macula, and a small notch in the upper right edge of the circle.",
    ),
    _photo(
        "camera", "camera.png", "man camera tripod coat field buildings",
        "A black-and-white photo of a man in a dark coat using a camera on a tripod in a grassy field with "
        "buildings behind.",
        "A black-and-white photo of a man with dark hair in a long black coat looking through a camera "
        "mounted on a tripod, standing in a flat grassy field with a few buildings far behind him.",
        "A black-and-white photo of a young man with short dark hair and a long black coat, leaning forward "
        "to look through a small camera mounted on a metal tripod; he stands in a flat grassy field, "
        "and in the distance under a pale sky are domed buildings, a tall tower and other buildings.",
        gray=True,
    ),
    _photo(
        "coins", "coins.png", "coins rows heads",
        "A black-and-white photo of ancient coins with heads, laid out in rows on a dark background.",
        "A black-and-white photo of twenty-four ancient silver coins in four rows on a dark cloth, most "
        "showing heads in profile, some showing figures.",
        "A black-and-white photo of twenty-four worn ancient Greek coins laid out in four rows on a dark "
        "background; most show heads in profile with helmets or curled hair, a few show standing figures, "
        "and the coins differ a little in size and brightness.",
        gray=True,
    ),
    _photo(
        "page", "page.png", "page text book heading",
        "A photo of a printed book page with a heading and lines of text.",
        "A slightly curved photo of a printed book page about region-based segmentation: a large heading, "
        "a paragraph of text and a line of code.",
        "A grey photo of a printed book page, slightly curved and unevenly lit: the heading reads "
        "\"Region-based segmentation\", a paragraph of text explains markers of coins and background, and a "
        "line of Python code starts with markers = np.zeros_like.",
        gray=True,
    ),
    _photo(
        "immunohistochemistry", "ihc.png", "microscope tissue cells nuclei",
        "A microscope image of stained tissue with brown cells and blue nuclei.",
        "A microscope image of a tissue section stained for immunohistochemistry: brown-stained glands of "
        "columnar cells with blue nuclei, separated by pale connective tissue.",
        "A microscope image of a tissue section stained for immunohistochemistry: curved glands of tall "
        "columnar cells whose membranes are stained brown surround blue-grey nuclei, and between them lies "
        "pale, fibrous connective tissue with small elongated blue nuclei and a few white gaps.",
    ),
    _photo(
        "moon", "moon.png", "moon surface craters",
        "A grey photo of the moon surface with small craters.",
        "A grey close-up of the moon surface: a flat dusty plain with small round craters, a bright crater "
        "rim near the top left and darker patches in the middle.",
        "A grey close-up of the moon surface seen from above: a flat, dusty plain dotted with small round "
        "craters, one larger bright crater rim near the top left, a chain of dark rough patches running "
        "down the middle, and faint bright streaks of ejected material.",
        gray=True,
    ),
    _photo(
        "brick", "brick.png", "brick pavement rows",
        "A grey photo of a brick pavement with rows of bricks seen at an angle.",
        "A grey photo of a brick pavement seen at an angle: long rows of rectangular bricks with light "
        "mortar joints that converge towards the top.",
        "A grey photo of a brick pavement seen at an oblique angle: long staggered rows of rectangular "
        "bricks with slightly rough surfaces, separated by thin light mortar joints, the rows narrowing and "
        "converging towards the top right.",
        gray=True,
    ),
    _photo(
        "grass", "grass.png", "grass lawn leaves clover",
        "A grey close-up of a lawn with grass blades, leaves and clover.",
        "A grey close-up of a lawn seen from above: dense thin grass blades mixed with small clover and "
        "other leaves.",
        "A grey close-up of a lawn seen from above: a dense tangle of thin, crossing grass blades, with "
        "small three-part clover leaves and a few broader leaves scattered through it, bright blades "
        "against dark gaps.",
        gray=True,
    ),
    _photo(
        "gravel", "gravel.png", "gravel stones",
        "A grey close-up of gravel made of many small stones.",
        "A grey close-up of gravel: many small angular stones of similar size, lit from one side.",
        "A grey close-up of gravel seen from above: hundreds of small, sharp-edged angular stones of similar "
        "size packed together, their lit faces bright and their shadows dark between them.",
        gray=True,
    ),
    _photo(
        "text", "text.png", "handwriting formulas paper",
        "A grey photo of handwriting with math formulas on paper.",
        "A grey photo of handwriting on lined paper, seen at an angle: several math formulas written with a "
        "dark pen.",
        "A grey photo of handwriting on lined paper seen at a steep angle with a shallow focus: math formulas "
        "with parentheses, equals signs, an integral and the letters s and t written in dark pen, sharp in "
        "the middle and blurred at the top and bottom.",
        gray=True,
    ),
)
PHOTOS_BY_NAME: dict[str, PhotoInfo] = {p.name: p for p in PHOTOS}


def skimage_data_dir() -> Path:
    """scikit-image's bundled data folder (imports only the small ``skimage.data`` package)."""
    import skimage.data  # lazy: only the default dataset needs scikit-image

    return Path(skimage.data.__file__).parent


def photo_path(name: str) -> Path:
    """Where the photo's file lies."""
    try:
        info = PHOTOS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown photo {name!r}; known: {sorted(PHOTOS_BY_NAME)}") from None
    return skimage_data_dir() / info.file


def load_photo(name: str) -> np.ndarray:
    """The photo as (H, W, 3) uint8 RGB (greyscale ones expanded). Raises ``BadImageError`` when missing."""
    return load_rgb(photo_path(name))
