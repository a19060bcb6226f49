"""PNG pictures of digits and training curves, written atomically."""

import math
import os

import numpy as np

from fastvae.errors import ImageError
from fastvae.files import write_atomic


def _as_image_stack(images):
    """Return images as an (N, H, W) float array; flat rows must be square."""
    stack = np.asarray(images, dtype=np.float32)
    if stack.ndim == 2:
        side = math.isqrt(stack.shape[1])
        if side * side != stack.shape[1]:
            raise ValueError(
                f"each flat image must have a square number of pixels, got {stack.shape[1]}"
            )
        stack = stack.reshape(len(stack), side, side)
    elif stack.ndim != 3:
        raise ValueError(f"images must have shape (N, H*W) or (N, H, W), got {stack.shape}")
    if len(stack) == 0:
        raise ValueError("there are no images to draw")
    return stack


def tile_images(images, ncols=None, pad=2, pad_value=1.0):
    """Lay N images out as one 2-D mosaic, row by row, with `pad` pixels around each tile."""
    stack = _as_image_stack(images)
    count, height, width = stack.shape
    ncols = math.ceil(math.sqrt(count)) if ncols is None else int(ncols)
    if ncols < 1 or pad < 0:
        raise ValueError(f"ncols must be at least 1 and pad not negative, got {ncols} and {pad}")
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    mosaic = np.full(
        (nrows * (height + pad) + pad, ncols * (width + pad) + pad), pad_value, dtype=np.float32
    )
    for index, image in enumerate(stack):
        top = pad + (index // ncols) * (height + pad)
        left = pad + (index % ncols) * (width + pad)
        mosaic[top:top + height, left:left + width] = image
    return mosaic


def _title_band(title, width):
    """Return a white grayscale PIL strip of the given width with the title in black."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), title, font=font)
    band = Image.new("L", (width, bottom - top + 8), 255)
    ImageDraw.Draw(band).text(((width - (right - left)) // 2 - left, 4 - top), title, fill=0, font=font)
    return band


def _mosaic_picture(mosaic, title, scale):
    """Turn a [0, 1] mosaic into a grayscale PIL image, upscaled nearest-neighbour, titled."""
    from PIL import Image

    if int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    pixels = np.clip(np.nan_to_num(mosaic), 0.0, 1.0)
    picture = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    picture = picture.resize(
        (picture.width * int(scale), picture.height * int(scale)), Image.Resampling.NEAREST
    )
    if not title:
        return picture
    band = _title_band(str(title), picture.width)
    titled = Image.new("L", (picture.width, band.height + picture.height), 255)
    titled.paste(band, (0, 0))
    titled.paste(picture, (0, band.height))
    return titled


def image_format(path):
    """The PIL format a picture at `path` is written in: its suffix's (PNG when it has none)."""
    from PIL import Image

    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if not suffix:
        return "PNG"
    known = Image.registered_extensions()
    if known.get(suffix) not in Image.SAVE:
        raise ImageError(f"cannot write {path}: no image format that can be saved ends in "
                         f"{suffix!r}; use .png (or .jpg, .gif, .bmp, .tif, .webp)")
    return known[suffix]


def _save_mosaic(path, mosaic, title, scale):
    """Write a mosaic as a grayscale picture at path (format from its suffix), atomically."""
    picture = _mosaic_picture(mosaic, title, scale)
    kind = image_format(path)
    write_atomic(path, lambda handle: picture.save(handle, format=kind))


def save_grid(path, images, ncols=None, title=None, scale=4, pad=2):
    """Write N images as one grayscale PNG grid, each pixel drawn as a scale x scale block."""
    _save_mosaic(path, tile_images(images, ncols=ncols, pad=pad), title, scale)


def _interleave_pairs(originals, reconstructions, ncols, fill):
    """Stack images so rows alternate: ncols originals, then their ncols reconstructions."""
    blanks_needed = (-len(originals)) % ncols
    blanks = np.full((blanks_needed,) + originals.shape[1:], fill, dtype=originals.dtype)
    top_rows = np.concatenate([originals, blanks]).reshape(-1, ncols, *originals.shape[1:])
    bottom_rows = np.concatenate([reconstructions, blanks]).reshape(top_rows.shape)
    return np.stack([top_rows, bottom_rows], axis=1).reshape(-1, *originals.shape[1:])


def save_comparison(path, originals, reconstructions, ncols=10, title=None, scale=4, pad=2):
    """Write originals and reconstructions as alternating rows so each pair sits one above the other."""
    originals = _as_image_stack(originals)
    reconstructions = _as_image_stack(reconstructions)
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {originals.shape} and reconstructions {reconstructions.shape} must match"
        )
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    ncols = min(int(ncols), len(originals))
    paired = _interleave_pairs(originals, reconstructions, ncols, fill=1.0)
    _save_mosaic(path, tile_images(paired, ncols=ncols, pad=pad), title, scale)


def save_rows(path, rows, title=None, scale=4, pad=2):
    """Write equal-length rows of images (e.g. latent interpolations) as one grid, one row each."""
    stacks = [_as_image_stack(row) for row in rows]
    if not stacks:
        raise ValueError("there are no rows to draw")
    if any(stack.shape != stacks[0].shape for stack in stacks):
        shapes = [stack.shape for stack in stacks]
        raise ValueError(f"all rows must hold the same number and size of images, got {shapes}")
    mosaic = tile_images(np.concatenate(stacks), ncols=len(stacks[0]), pad=pad)
    _save_mosaic(path, mosaic, title, scale)


def plot_curves(path, series, title, xlabel="epoch", ylabel="loss", x=None, log_scale=False):
    """Write a line chart PNG, one labelled line per non-empty series; return the names drawn.

    `log_scale` puts the y axis on a log scale, so losses of different sizes all show.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    drawn = []
    for name, values in series.items():
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            continue
        values[~np.isfinite(values)] = np.nan
        steps = np.arange(1, values.size + 1) if x is None else np.asarray(x, dtype=np.float64)
        if steps.shape != values.shape:
            raise ValueError(f"x has {steps.size} points but series {name!r} has {values.size}")
        axes.plot(steps, values, label=str(name))
        drawn.append(str(name))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if log_scale:
        axes.set_yscale("log")
    if drawn:
        axes.legend()
    # fixed margins: the trainer redraws these every epoch and tight_layout's search was 40 %
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.93)
    write_atomic(path, lambda handle: figure.savefig(handle, format="png"))
    return drawn
