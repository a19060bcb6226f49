import os

import numpy as np
import pytest
from PIL import Image

from fastvae import viz


def constant_images(count, value, side=28):
    """Return count flat side x side images all equal to value."""
    return np.full((count, side * side), value, dtype=np.float32)


def png_pixels(path):
    """Return the PNG at path as (mode, 2-D uint8 array of its luminance)."""
    with Image.open(path) as picture:
        return picture.mode, np.asarray(picture.convert("L"))


def test_tile_shape_for_ten_images_in_four_columns_with_padding():
    mosaic = viz.tile_images(constant_images(10, 0.0), ncols=4, pad=2)
    assert mosaic.shape == (3 * 30 + 2, 4 * 30 + 2)


def test_tile_places_images_row_by_row_and_fills_the_rest_with_pad_value():
    stack = np.stack([np.full((5, 6), index / 10) for index in range(5)])
    mosaic = viz.tile_images(stack, ncols=3, pad=1, pad_value=0.9)
    assert mosaic.shape == (2 * 6 + 1, 3 * 7 + 1)
    np.testing.assert_allclose(mosaic[1:6, 1:7], 0.0)
    np.testing.assert_allclose(mosaic[1:6, 8:14], 0.1)
    np.testing.assert_allclose(mosaic[7:12, 8:14], 0.4)
    np.testing.assert_allclose(mosaic[7:12, 15:21], 0.9)
    np.testing.assert_allclose(mosaic[0], 0.9)


def test_tile_default_columns_is_ceil_sqrt():
    mosaic = viz.tile_images(constant_images(10, 0.5), pad=0)
    assert mosaic.shape == (3 * 28, 4 * 28)


@pytest.mark.parametrize(
    ("images", "message"),
    [(np.zeros((4, 783)), "square"), (np.zeros(784), "shape"), (np.zeros((0, 784)), "no images")],
)
def test_tile_rejects_bad_input_with_clear_text(images, message):
    with pytest.raises(ValueError, match=message):
        viz.tile_images(images)


def test_save_grid_writes_grayscale_png_of_expected_size(tmp_path):
    images = constant_images(10, 0.0)
    images[0] = 1.0
    path = tmp_path / "nested" / "grid.png"
    viz.save_grid(path, images, ncols=4, scale=3)
    mode, pixels = png_pixels(path)
    assert mode == "L"
    assert pixels.shape == (92 * 3, 122 * 3)
    assert pixels[3 * 2 + 1, 3 * 2 + 1] == 255
    assert pixels[3 * 2 + 1, 3 * 32 + 1] == 0
    assert pixels[0, 0] == 255


def test_save_grid_title_adds_a_band_on_top(tmp_path):
    viz.save_grid(tmp_path / "plain.png", constant_images(4, 0.0), scale=2)
    viz.save_grid(tmp_path / "titled.png", constant_images(4, 0.0), title="samples", scale=2)
    _, plain = png_pixels(tmp_path / "plain.png")
    _, titled = png_pixels(tmp_path / "titled.png")
    assert titled.shape[1] == plain.shape[1]
    assert titled.shape[0] > plain.shape[0]
    assert titled[: titled.shape[0] - plain.shape[0]].min() < 128


def test_save_comparison_interleaves_original_and_reconstruction_rows(tmp_path):
    path = tmp_path / "comparison.png"
    viz.save_comparison(path, constant_images(7, 0.0), constant_images(7, 0.6), ncols=4, scale=1)
    _, pixels = png_pixels(path)
    assert pixels.shape == (4 * 30 + 2, 4 * 30 + 2)
    tile_centres = [2 + 14 + row * 30 for row in range(4)]
    assert [pixels[centre, 16] for centre in tile_centres] == [0, 153, 0, 153]
    assert pixels[tile_centres[2], 2 + 14 + 3 * 30] == 255


def test_save_comparison_rejects_mismatched_counts(tmp_path):
    with pytest.raises(ValueError, match="must match"):
        viz.save_comparison(tmp_path / "c.png", constant_images(3, 0.0), constant_images(2, 0.0))
    assert not (tmp_path / "c.png").exists()


def test_save_rows_writes_one_grid_row_per_input_row(tmp_path):
    rows = [constant_images(5, value) for value in (0.0, 0.5, 1.0)]
    viz.save_rows(tmp_path / "rows.png", rows, scale=1)
    _, pixels = png_pixels(tmp_path / "rows.png")
    assert pixels.shape == (3 * 30 + 2, 5 * 30 + 2)
    assert [pixels[16 + row * 30, 16] for row in range(3)] == [0, 128, 255]


def test_save_rows_rejects_rows_of_different_lengths(tmp_path):
    with pytest.raises(ValueError, match="same number"):
        viz.save_rows(tmp_path / "rows.png", [constant_images(5, 0.0), constant_images(4, 0.0)])


def test_plot_curves_writes_png_and_skips_empty_series(tmp_path):
    path = tmp_path / "plots" / "losses.png"
    drawn = viz.plot_curves(
        path, {"real": [0.9, 0.7, 0.6], "empty": [], "fake": np.array([0.2, 0.4, 0.5])}, "discriminator losses"
    )
    assert drawn == ["real", "fake"]
    mode, pixels = png_pixels(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.min() < 100 < pixels.max()


def test_plot_curves_with_only_empty_series_still_writes_a_chart(tmp_path):
    assert viz.plot_curves(tmp_path / "none.png", {"a": []}, "nothing yet") == []
    assert (tmp_path / "none.png").stat().st_size > 0


def test_plot_curves_rejects_x_of_wrong_length(tmp_path):
    with pytest.raises(ValueError, match="x has 2 points"):
        viz.plot_curves(tmp_path / "bad.png", {"a": [1.0, 2.0, 3.0]}, "t", x=[1, 2])


def test_atomic_write_leaves_only_the_target(tmp_path):
    viz.save_grid(tmp_path / "grid.png", constant_images(3, 0.2))
    viz.plot_curves(tmp_path / "curve.png", {"a": [1.0, 2.0]}, "t")
    assert sorted(os.listdir(tmp_path)) == ["curve.png", "grid.png"]


def test_write_under_a_file_raises_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        viz.save_grid(blocker / "grid.png", constant_images(3, 0.2))
    assert sorted(os.listdir(tmp_path)) == ["blocker"]
    assert blocker.read_text() == "not a folder"


def test_failure_mid_write_keeps_old_target_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")

    def write_half_then_fail(self, handle, *args, **kwargs):
        handle.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        viz.save_grid(target, constant_images(3, 0.2))
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["grid.png"]


def test_plot_curves_log_scale_shows_small_and_large_losses(tmp_path):
    linear, logarithmic = tmp_path / "linear.png", tmp_path / "log.png"
    series = {"reconstruction": [500.0, 200.0, 100.0], "adversarial": [0.5, 2.0, 4.0]}
    viz.plot_curves(linear, series, "losses")
    viz.plot_curves(logarithmic, series, "losses", log_scale=True)
    assert linear.read_bytes() != logarithmic.read_bytes()
