"""Turn user-supplied digit pictures into 784-pixel MNIST-style inputs."""

import os
import warnings

import numpy as np

from fastvae.errors import ImageError

SIDE = 28
DIGIT_BOX = 20
MIN_SIDE = 8
MIN_CONTRAST = 0.1
INK_THRESHOLD = 0.1


def _open_image(path):
    """Open and fully decode path with PIL, turning failures into ImageError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ImageError(f"No image file at '{path}'; check the path and try again.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                return ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            f"'{path}' is too large to decode safely ({error}); scale the digit down to a few "
            "hundred pixels a side."
        ) from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageError(
            f"'{path}' is not a readable image ({error}); save the digit as a PNG or JPEG."
        ) from error


def _has_alpha(picture):
    """Return whether the picture carries transparency."""
    return picture.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in picture.info


def _backdrop(rgba):
    """White behind dark ink, black behind light ink (judged by the opaque pixels' lightness),
    so a drawing on a transparent background keeps its contrast whatever its colour."""
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64)
    lightness = np.asarray(rgba.convert("L"), dtype=np.float64)
    light_ink = alpha.sum() > 0 and (lightness * alpha).sum() / alpha.sum() > 127.5
    return (0, 0, 0, 255) if light_ink else (255, 255, 255, 255)


def _grayscale(picture):
    """Return the picture as a float [0, 1] grayscale array, transparency composited on a
    backdrop that contrasts with the ink."""
    from PIL import Image

    if picture.mode.startswith("I") or picture.mode == "F":
        values = np.asarray(picture, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        return np.clip(values / peak, 0.0, 1.0)
    if _has_alpha(picture):
        rgba = picture.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, _backdrop(rgba))
        picture = Image.alpha_composite(backdrop, rgba)
    return np.asarray(picture.convert("L"), dtype=np.float64) / 255.0


def _border_median(gray):
    """Return the median of the outermost pixels, taken as the background level."""
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return float(np.median(border))


def _ink(gray, path):
    """Return ink in [0, 1] on a black background, inverting light backgrounds."""
    background = _border_median(gray)
    ink = 1.0 - gray if background > 0.5 else gray
    background = min(background, 1.0 - background)
    contrast = float(ink.max()) - background
    if contrast < MIN_CONTRAST:
        raise ImageError(
            f"'{path}' has no visible digit (it is blank); draw the digit in a colour that stands out "
            "from the background."
        )
    return np.clip((ink - background) / contrast, 0.0, 1.0)


def _crop_to_ink(ink):
    """Return the smallest box of ink holding every pixel above the ink threshold."""
    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _fit_box(ink):
    """Resize ink so its longer side is DIGIT_BOX pixels, keeping the aspect ratio, anti-aliased."""
    from PIL import Image

    height, width = ink.shape
    ratio = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    resized = Image.fromarray(ink.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)


def _paste_centred(digit):
    """Place digit in a SIDE x SIDE canvas with its centre of mass at the canvas centre."""
    canvas = np.zeros((SIDE, SIDE), dtype=np.float32)
    height, width = digit.shape
    rows, cols = np.indices(digit.shape)
    mass = digit.sum()
    centre = (SIDE - 1) / 2
    top = int(np.clip(round(centre - (rows * digit).sum() / mass), 0, SIDE - height))
    left = int(np.clip(round(centre - (cols * digit).sum() / mass), 0, SIDE - width))
    canvas[top:top + height, left:left + width] = digit
    return canvas


def _is_mnist_like(picture, gray):
    """Return whether the picture is already a 28x28 grayscale light-on-dark digit."""
    return picture.mode == "L" and gray.shape == (SIDE, SIDE) and _border_median(gray) <= 0.5


def load_digit(path):
    """Load one image file as a (784,) float32 MNIST-style digit in [0, 1]."""
    path = os.fspath(path)
    picture = _open_image(path)
    if min(picture.size) < MIN_SIDE:
        raise ImageError(
            f"'{path}' is only {picture.width}x{picture.height} pixels; use an image at least {MIN_SIDE}x{MIN_SIDE}."
        )
    gray = _grayscale(picture)
    ink = _ink(gray, path)
    if _is_mnist_like(picture, gray):
        return gray.astype(np.float32).ravel()
    return _paste_centred(_fit_box(_crop_to_ink(ink))).ravel()


def load_digits(paths):
    """Load several image files as an (N, 784) float32 array, one row per file."""
    digits = [load_digit(path) for path in paths]
    if not digits:
        return np.empty((0, SIDE * SIDE), dtype=np.float32)
    return np.stack(digits)
