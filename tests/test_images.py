import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastvae import images
from fastvae.images import ImageError


def draw_blob(picture, ink):
    """Draw a digit-like blob (an off-centre ring with a tail) in colour ink."""
    draw = ImageDraw.Draw(picture)
    draw.ellipse((10, 8, 55, 40), outline=ink, width=6)
    draw.line((50, 30, 70, 50), fill=ink, width=6)


def centre_of_mass(digit):
    """Return the (row, col) intensity centre of mass of a (784,) digit."""
    square = digit.reshape(28, 28)
    rows, cols = np.indices(square.shape)
    return (rows * square).sum() / square.sum(), (cols * square).sum() / square.sum()


def ink_box(digit):
    """Return (height, width) of the bounding box of non-zero pixels."""
    rows = np.flatnonzero(digit.reshape(28, 28).any(axis=1))
    cols = np.flatnonzero(digit.reshape(28, 28).any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


@pytest.fixture
def blob_path(tmp_path):
    picture = Image.new("L", (100, 60), 255)
    draw_blob(picture, 0)
    path = tmp_path / "blob.png"
    picture.save(path)
    return path


def test_black_on_white_blob_becomes_centred_mnist_digit(blob_path):
    digit = images.load_digit(blob_path)
    assert digit.shape == (784,)
    assert digit.dtype == np.float32
    assert digit.min() >= 0.0 and digit.max() <= 1.0
    assert digit.max() > 0.9
    row, col = centre_of_mass(digit)
    assert abs(row - 14) <= 1 and abs(col - 14) <= 1
    height, width = ink_box(digit)
    assert width == 20 and 10 <= height < 20
    border = digit.reshape(28, 28)[[0, -1]]
    assert border.max() == 0.0


def test_light_on_dark_large_image_is_not_inverted(tmp_path):
    picture = Image.new("L", (100, 60), 0)
    draw_blob(picture, 255)
    picture.save(tmp_path / "dark.png")
    digit = images.load_digit(tmp_path / "dark.png")
    assert digit.reshape(28, 28)[0].max() == 0.0
    assert digit.max() > 0.9


def test_mnist_like_image_passes_through_unchanged(tmp_path):
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[4:24, 6:22] = np.random.default_rng(0).integers(0, 256, size=(20, 16), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "mnist.png")
    digit = images.load_digit(tmp_path / "mnist.png")
    np.testing.assert_array_equal(digit, (pixels / 255.0).astype(np.float32).ravel())


def test_transparent_background_is_composited_on_white(tmp_path, blob_path):
    picture = Image.new("RGBA", (100, 60), (0, 0, 0, 0))
    draw_blob(picture, (0, 0, 0, 255))
    picture.save(tmp_path / "alpha.png")
    digit = images.load_digit(tmp_path / "alpha.png")
    np.testing.assert_allclose(digit, images.load_digit(blob_path), atol=1e-6)


def test_load_digits_stacks_rows(blob_path):
    assert images.load_digits([blob_path, blob_path]).shape == (2, 784)
    assert images.load_digits([]).shape == (0, 784)


def write_blank(path):
    Image.new("L", (50, 50), 255).save(path)


def write_text(path):
    path.write_text("this is not a picture\n")


def write_tiny(path):
    picture = Image.new("L", (5, 5), 255)
    picture.putpixel((2, 2), 0)
    picture.save(path)


@pytest.mark.parametrize(
    ("make", "phrase"),
    [(write_blank, "blank"), (write_text, "not a readable image"), (write_tiny, "at least 8x8"),
     (None, "No image file")],
)
def test_unusable_images_raise_image_error_naming_the_file(tmp_path, make, phrase):
    path = tmp_path / "digit.png"
    if make is not None:
        make(path)
    with pytest.raises(ImageError, match=phrase) as caught:
        images.load_digit(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)
