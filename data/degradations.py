"""Real-ESRGAN second-order degradation (Wang et al., ICCV-W 2021) as seeded pure functions, with labels.

The order of operations follows basicsr's ``RealESRGANDataset`` (kernels) and ``RealESRGANModel.feed_data``
(the pipeline), on numpy + OpenCV instead of torch, for one image at a time::

    HR -> blur k1 -> resize x f1 (up|down|keep) -> noise (gaussian|poisson, color|gray) -> JPEG q1
       -> blur k2 (p = second_blur_prob) -> resize to (HR/scale) x f2 -> noise -> then, with p = 0.5 each:
          [resize to HR/scale, final sinc, JPEG q2]  or  [JPEG q2, resize to HR/scale, final sinc]
       -> LR, exactly (H/scale, W/scale)

Two steps, so that any degradation can be replayed from its labels: ``sample_params`` draws every random
choice into a JSON-serialisable dict (each noise field gets its own seed), and ``apply_params`` is a
deterministic function of (HR, params). ``degrade`` does both and adds the per-item levels of the paper's
``<degradation>`` text (see ``LEVEL_RULES``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy import special

from core.chain import DEGRADATION_ITEMS, LEVELS
from core.config import DegradationConfig
from core.records import DegradationLabels

ITEMS: tuple[str, ...] = DEGRADATION_ITEMS  # blur, downsample, noise, compression, upsample
KERNEL_TYPES: tuple[str, ...] = (
    "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso",
)
RESIZE_MODES: dict[str, int] = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_HALF = math.sqrt(2.0 * math.log(2.0))  # a Gaussian of sigma s halves its frequency response at _HALF / s


# ------------------------------------------------------------------------------------------ level table
@dataclass(frozen=True)
class LevelRule:
    """How one item's level is read from one measure of the sampled parameters.

    ``bounds`` are where light, medium and heavy begin. Ascending rules (larger = worse) use ``value >= b``;
    descending rules (smaller = worse, JPEG quality and the downscale product) use ``value < b``.
    """

    measure: str  # key in params["measures"]
    unit: str
    bounds: tuple[float, float, float]
    descending: bool = False

    def level(self, value: float) -> str:
        hits = sum((value < b) if self.descending else (value >= b) for b in self.bounds)
        return LEVELS[hits]


LEVEL_RULES: dict[str, LevelRule] = {
    "blur": LevelRule("blur_sigma", "HR pixels", (1.2, 2.4, 3.6)),
    "downsample": LevelRule("downscale", "factor", (0.95, 0.7, 0.4), descending=True),
    "noise": LevelRule("noise_sigma", "0-255 grey levels", (2.0, 6.0, 12.0)),
    "compression": LevelRule("jpeg_quality", "JPEG quality", (90.0, 65.0, 40.0), descending=True),
    "upsample": LevelRule("upscale", "factor", (1.05, 1.15, 1.3)),
}
"""The level thresholds, one rule per item of the paper's ``<degradation>`` text.

The measures (computed by ``measures_of``; all stored in ``labels.params["measures"]``):

- ``blur_sigma``: the effective Gaussian sigma of all blur, in HR pixels, added in quadrature:
  ``sqrt(s1**2 + (s2 / f1)**2 + (s_sinc * scale)**2)``. ``s1`` is the first kernel, ``s2`` the second kernel
  (0 when the second blur was skipped; divided by f1 because it acts on the image resized by f1), ``s_sinc``
  the final sinc (0 when skipped; times ``scale`` because it acts on the LR grid). A Gaussian-family kernel
  counts as ``sqrt(sigma_x * sigma_y)``. A sinc (ideal circular low-pass at ``omega_c``) counts as the
  Gaussian with the same half-amplitude frequency less the pixel grid's own band limit,
  ``sqrt(max((c/omega_c)**2 - (c/pi)**2, 0))`` with ``c = sqrt(2 ln 2)``, so a sinc at ``omega_c = pi`` adds
  nothing. Bounds 1.2 / 2.4 / 3.6: at half the x4 LR Nyquist frequency a Gaussian of sigma 1.2 HR px keeps
  89% of the amplitude (a slight softening), 2.4 keeps 64%, 3.6 keeps 37% (LR-scale detail is mostly gone).
- ``downscale``: the product of the random resize factors that shrank the image (Real-ESRGAN's ``down``
  choice, stage 1 relative to HR, stage 2 relative to the LR size; 1.0 when neither stage chose ``down``).
  The fixed final ``1/scale`` resize is the SR task itself, not a degradation item. Bounds 0.95 / 0.7 / 0.4:
  below a 5% shrink is none; less than 0.4 is heavy.
- ``noise_sigma``: the noise as it shows in the LR image: the RMS difference, in 0-255 grey levels, between
  the LR image and the same degradation replayed without its two noise steps. Later blur, resizing and JPEG
  attenuate noise a lot (the noise as added, ``noise_added`` = both stages' RMS in quadrature, has a median
  of ~24 with the defaults; in the LR image ~10), so the LR value is the one the policy can perceive.
  Bounds 2 / 6 / 12: below 2 levels is invisible, 12 is strong grain.
- ``jpeg_quality``: the lowest JPEG quality of the two JPEG steps (100 = no JPEG; a sampled quality of 100
  skips the encoder). Bounds 90 / 65 / 40: below 90 is light, below 65 medium, below 40 heavy.
- ``upscale``: the product of the random resize factors that enlarged the image (Real-ESRGAN's ``up``
  choice; 1.0 when no stage chose ``up``). Bounds 1.05 / 1.15 / 1.3 (the default maximum is 1.5 x 1.2).

With the default (Real-ESRGAN x4) config on 64 px crops the levels none/light/medium/heavy come out at about
blur 8/33/37/21%, downsample 20/20/30/30%, noise 1/18/46/36%, compression 1/20/51/28%, upsample 65/15/11/9%
(``tests/test_degradations.py::test_default_config_uses_every_level`` checks every level occurs).
"""


def levels_from_measures(measures: dict[str, float]) -> dict[str, str]:
    """Item -> level (``core.chain.LEVELS``), in ``ITEMS`` order, by ``LEVEL_RULES``."""
    return {item: LEVEL_RULES[item].level(float(measures[LEVEL_RULES[item].measure])) for item in ITEMS}


# ------------------------------------------------------------------------------------------ kernels
def kernel_sizes(max_size: int) -> list[int]:
    """Odd kernel sizes 7..max_size (Real-ESRGAN's kernel_range); [max_size] for a max below 7."""
    return [k for k in range(7, max_size + 1, 2)] or [max_size]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    return np.meshgrid(ax, ax)  # xx (size, size), yy (size, size)


def gaussian_family_kernel(kind: str, size: int, sigma_x: float, sigma_y: float, theta: float,
                           beta: float = 1.0) -> np.ndarray:
    """Normalised (size, size) kernel: Gaussian, generalized Gaussian exp(-q^beta / 2) or plateau 1/(1+q^beta),
    where q is the squared Mahalanobis radius of the rotated (sigma_x, sigma_y) covariance."""
    xx, yy = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy  # coordinates along the principal axes
    v = -s * xx + c * yy
    q = (u / sigma_x) ** 2 + (v / sigma_y) ** 2
    family = kind.split("_")[0]
    if family in ("iso", "aniso"):
        k = np.exp(-0.5 * q)
    elif family == "generalized":
        k = np.exp(-0.5 * np.power(q, beta))
    elif family == "plateau":
        k = 1.0 / (np.power(q, beta) + 1.0)
    else:
        raise ValueError(f"unknown blur kernel type {kind!r}; known: {KERNEL_TYPES + ('sinc',)}")
    return k / k.sum()


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """Normalised (size, size) circular low-pass (2-D sinc / jinc) with cutoff ``omega_c`` rad/pixel."""
    xx, yy = _grid(size)
    r = np.hypot(xx, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * special.j1(omega_c * r) / (2.0 * np.pi * r)
    k[r == 0] = omega_c**2 / (4.0 * np.pi)
    return k / k.sum()


def build_kernel(spec: dict[str, Any], pad_to: int = 0) -> np.ndarray:
    """The kernel a params entry describes, zero-padded to ``pad_to`` (float32)."""
    if spec["type"] == "sinc":
        k = sinc_kernel(spec["size"], spec["omega_c"])
    else:
        k = gaussian_family_kernel(spec["type"], spec["size"], spec["sigma_x"], spec["sigma_y"],
                                   spec["theta"], spec.get("beta", 1.0))
    if pad_to > k.shape[0]:
        p = (pad_to - k.shape[0]) // 2
        k = np.pad(k, p)
    return k.astype(np.float32)


def kernel_sigma(spec: dict[str, Any]) -> float:
    """Effective Gaussian sigma of a kernel in the pixels it is applied on (see ``LEVEL_RULES``)."""
    if spec["type"] == "sinc":
        return math.sqrt(max((_HALF / spec["omega_c"]) ** 2 - (_HALF / math.pi) ** 2, 0.0))
    return math.sqrt(spec["sigma_x"] * spec["sigma_y"])


# ------------------------------------------------------------------------------------------ sampling
def _uniform(rng: np.random.Generator, bounds: list[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _pick(rng: np.random.Generator, names: list[str] | tuple[str, ...], probs: list[float]) -> str:
    p = np.asarray(probs, dtype=np.float64)
    return str(names[int(rng.choice(len(names), p=p / p.sum()))])


def _beta(rng: np.random.Generator, bounds: list[float]) -> float:
    # Real-ESRGAN: half the time below 1 (sharper peak, heavier tails), half above
    return _uniform(rng, [bounds[0], 1.0]) if rng.random() < 0.5 else _uniform(rng, [1.0, bounds[1]])


def _sample_kernel(rng: np.random.Generator, cfg: DegradationConfig, second: bool) -> dict[str, Any]:
    kinds, probs = (cfg.kernel_list2, cfg.kernel_prob2) if second else (cfg.kernel_list, cfg.kernel_prob)
    sinc_prob = cfg.sinc_prob2 if second else cfg.sinc_prob
    sigma = cfg.blur_sigma2 if second else cfg.blur_sigma
    size = int(rng.choice(kernel_sizes(cfg.kernel_size)))
    if rng.random() < sinc_prob:
        low = math.pi / 3 if size < 13 else math.pi / 5
        return {"type": "sinc", "size": size, "omega_c": _uniform(rng, [low, math.pi])}
    kind = _pick(rng, kinds, probs)
    if kind not in KERNEL_TYPES:
        raise ValueError(f"data.degradation.kernel_list{'2' if second else ''}: unknown kernel type {kind!r}; "
                         f"known: {KERNEL_TYPES}")
    sx = _uniform(rng, sigma)
    sy, theta = (_uniform(rng, sigma), _uniform(rng, [-math.pi, math.pi])) if kind.endswith("aniso") else (sx, 0.0)
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _beta(rng, cfg.betag_range2 if second else cfg.betag_range)
    elif kind.startswith("plateau"):
        beta = _beta(rng, cfg.betap_range2 if second else cfg.betap_range)
    return {"type": kind, "size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta, "beta": beta}


def _sample_resize(rng: np.random.Generator, probs: list[float], bounds: list[float], key: str) -> dict[str, Any]:
    if not 0 < bounds[0] <= 1 <= bounds[1]:
        raise ValueError(f"data.degradation.{key} = {bounds}: needs [min <= 1, max >= 1] with min > 0 "
                         "(down factors are drawn from [min, 1], up factors from [1, max])")
    kind = _pick(rng, ("up", "down", "keep"), probs)
    factor = {"up": lambda: _uniform(rng, [1.0, bounds[1]]), "down": lambda: _uniform(rng, [bounds[0], 1.0]),
              "keep": lambda: 1.0}[kind]()
    return {"type": kind, "factor": factor, "mode": _pick(rng, tuple(RESIZE_MODES), [1, 1, 1])}


def _sample_noise(rng: np.random.Generator, gaussian_prob: float, sigma: list[float], poisson: list[float],
                  gray_prob: float) -> dict[str, Any]:
    if rng.random() < gaussian_prob:
        noise: dict[str, Any] = {"type": "gaussian", "sigma": _uniform(rng, sigma)}
    else:
        noise = {"type": "poisson", "scale": _uniform(rng, poisson)}
    noise["gray"] = bool(rng.random() < gray_prob)
    noise["seed"] = int(rng.integers(0, 2**31 - 1))
    return noise


def _sample_quality(rng: np.random.Generator, bounds: list[float]) -> int:
    return round(_uniform(rng, bounds))


def sample_params(cfg: DegradationConfig, scale: int, rng: np.random.Generator) -> dict[str, Any]:
    """Draw every random choice of one degradation (JSON-serialisable; replay with ``apply_params``)."""
    stage1 = {
        "kernel": _sample_kernel(rng, cfg, second=False),
        "resize": _sample_resize(rng, cfg.resize_prob, cfg.resize_range, "resize_range"),
        "noise": _sample_noise(rng, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range,
                               cfg.gray_noise_prob),
        "jpeg_quality": _sample_quality(rng, cfg.jpeg_range),
    }
    stage2 = {
        "blur": bool(rng.random() < cfg.second_blur_prob),
        "kernel": _sample_kernel(rng, cfg, second=True),
        "resize": _sample_resize(rng, cfg.resize_prob2, cfg.resize_range2, "resize_range2"),
        "noise": _sample_noise(rng, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2,
                               cfg.gray_noise_prob2),
    }
    final: dict[str, Any] = {
        "order": "resize_sinc_jpeg" if rng.random() < 0.5 else "jpeg_resize_sinc",
        "resize_mode": _pick(rng, tuple(RESIZE_MODES), [1, 1, 1]),
        "jpeg_quality": _sample_quality(rng, cfg.jpeg_range2),
        "sinc": None,
    }
    if rng.random() < cfg.final_sinc_prob:
        final["sinc"] = {"type": "sinc", "size": int(rng.choice(kernel_sizes(cfg.kernel_size))),
                         "omega_c": _uniform(rng, [math.pi / 3, math.pi])}
    return {"scale": int(scale), "kernel_pad": int(cfg.kernel_size), "stage1": stage1, "stage2": stage2,
            "final": final}


# ------------------------------------------------------------------------------------------ operations
def _filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # correlation == convolution: every kernel here is point-symmetric; reflect border as basicsr's filter2D
    return cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _resize(x: np.ndarray, hw: tuple[int, int], mode: str) -> np.ndarray:
    h, w = max(1, hw[0]), max(1, hw[1])
    if (h, w) == x.shape[:2]:
        return x
    return cv2.resize(x, (w, h), interpolation=RESIZE_MODES[mode])


def _to_gray(x: np.ndarray) -> np.ndarray:
    return (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]  # (h, w, 1)


def _add_noise(x: np.ndarray, spec: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Add the noise ``spec`` describes; returns (clipped image, RMS of the added noise in 0-255 levels)."""
    rng = np.random.default_rng(spec["seed"])
    h, w = x.shape[:2]
    channels = 1 if spec["gray"] else 3
    if spec["type"] == "gaussian":
        if spec["sigma"] <= 0:
            return x, 0.0
        noise = rng.standard_normal((h, w, channels), dtype=np.float32) * np.float32(spec["sigma"] / 255.0)
        rms = float(spec["sigma"])
    else:
        if spec["scale"] <= 0:
            return x, 0.0
        base = _to_gray(x) if spec["gray"] else x
        levels = np.clip(np.rint(base * 255.0), 0, 255).astype(np.uint8)  # Real-ESRGAN quantises first
        vals = 2.0 ** math.ceil(math.log2(max(1, np.count_nonzero(np.bincount(levels.ravel(), minlength=256)))))
        img = levels.astype(np.float64) / 255.0
        noise = ((rng.poisson(img * vals) / vals - img) * spec["scale"]).astype(np.float32)
        rms = float(np.sqrt(np.mean(np.square(noise)))) * 255.0
    return np.clip(x + noise, 0.0, 1.0), rms


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip at ``quality`` (100 = no JPEG). Encoded as BGR so OpenCV's YCbCr is the right one."""
    if quality >= 100:
        return x
    u8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV fails only on empty images, which _resize prevents
        raise RuntimeError(f"JPEG encoding failed for an image of shape {u8.shape}")
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return out.astype(np.float32) * np.float32(1.0 / 255.0)


def apply_params(hr: np.ndarray, params: dict[str, Any],
                 with_noise: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """Degrade ``hr`` (H, W, 3) uint8 as ``params`` says -> (LR (H/scale, W/scale, 3) uint8, noise RMS).

    The second value holds what only the image can tell: the RMS of each stage's noise as added (0-255
    levels). ``with_noise=False`` replays everything but the two noise steps (for the ``noise_sigma`` measure).
    """
    scale = params["scale"]
    if hr.ndim != 3 or hr.shape[2] != 3 or hr.dtype != np.uint8:
        raise ValueError(f"HR image must be (H, W, 3) uint8, got {hr.shape} {hr.dtype}")
    big_h, big_w = hr.shape[:2]
    if big_h % scale or big_w % scale:
        raise ValueError(f"HR size {big_h}x{big_w} is not divisible by scale {scale}")
    lr_h, lr_w = big_h // scale, big_w // scale
    pad = params["kernel_pad"]
    s1, s2, fin = params["stage1"], params["stage2"], params["final"]

    x = hr.astype(np.float32) * np.float32(1.0 / 255.0)  # (H, W, 3) in [0, 1]
    # ---- first order
    x = _filter(x, build_kernel(s1["kernel"], pad))
    f1 = s1["resize"]["factor"]
    x = _resize(x, (int(big_h * f1), int(big_w * f1)), s1["resize"]["mode"])
    x, rms1 = _add_noise(x, s1["noise"]) if with_noise else (x, 0.0)
    x = _jpeg(x, s1["jpeg_quality"])
    # ---- second order
    if s2["blur"]:
        x = _filter(x, build_kernel(s2["kernel"], pad))
    f2 = s2["resize"]["factor"]
    x = _resize(x, (int(lr_h * f2), int(lr_w * f2)), s2["resize"]["mode"])
    x, rms2 = _add_noise(x, s2["noise"]) if with_noise else (x, 0.0)
    # ---- final: resize to LR + sinc, and JPEG, in a random order
    sinc = build_kernel(fin["sinc"], pad) if fin["sinc"] else None

    def resize_sinc(y: np.ndarray) -> np.ndarray:
        y = _resize(y, (lr_h, lr_w), fin["resize_mode"])
        return _filter(y, sinc) if sinc is not None else y

    if fin["order"] == "resize_sinc_jpeg":
        x = _jpeg(resize_sinc(x), fin["jpeg_quality"])
    else:
        x = resize_sinc(_jpeg(x, fin["jpeg_quality"]))
    lr = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return lr, {"noise_rms1": rms1, "noise_rms2": rms2}


# ------------------------------------------------------------------------------------------ labels
def measures_of(params: dict[str, Any], noise: dict[str, float], lr_noise_rms: float) -> dict[str, float]:
    """The five measures ``LEVEL_RULES`` reads (plus ``noise_added``, for logs), from the sampled params, the
    noise RMS as added per stage and the noise RMS seen in the LR image."""
    s1, s2, fin = params["stage1"], params["stage2"], params["final"]
    f1 = s1["resize"]["factor"]
    blur2 = kernel_sigma(s2["kernel"]) / f1 if s2["blur"] else 0.0
    sinc = kernel_sigma(fin["sinc"]) * params["scale"] if fin["sinc"] else 0.0
    factors = [s1["resize"]["factor"], s2["resize"]["factor"]]
    return {
        "blur_sigma": math.sqrt(kernel_sigma(s1["kernel"]) ** 2 + blur2**2 + sinc**2),
        "downscale": math.prod(f for f in factors if f < 1.0),
        "upscale": math.prod(f for f in factors if f > 1.0),
        "noise_sigma": float(lr_noise_rms),
        "noise_added": math.hypot(noise["noise_rms1"], noise["noise_rms2"]),
        "jpeg_quality": float(min(s1["jpeg_quality"], fin["jpeg_quality"], 100)),
    }


def degrade(hr: np.ndarray, cfg: DegradationConfig, scale: int,
            rng: np.random.Generator) -> tuple[np.ndarray, DegradationLabels]:
    """HR (H, W, 3) uint8 -> (LR (H/scale, W/scale, 3) uint8, labels). Deterministic given ``rng``'s state.

    ``labels.params`` holds the sampled parameters (replayable with ``apply_params``), the noise RMS as
    added and the ``measures``; ``labels.levels`` maps each item to a level by ``LEVEL_RULES``.
    """
    params = sample_params(cfg, scale, rng)
    lr, noise = apply_params(hr, params)
    lr_noise = 0.0
    if noise["noise_rms1"] > 0 or noise["noise_rms2"] > 0:
        clean, _ = apply_params(hr, params, with_noise=False)
        lr_noise = float(np.sqrt(np.mean(np.square(lr.astype(np.float32) - clean.astype(np.float32)))))
    measures = measures_of(params, noise, lr_noise)
    params = {**params, "noise_measured": noise, "measures": measures}
    return lr, DegradationLabels(levels=levels_from_measures(measures), params=params)
