"""Bad files, images, paths and environments each end in one line naming the problem."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from fastvae import cli, images
from fastvae.archive import write as write_archive
from fastvae.config import Config
from fastvae.errors import CheckpointError, FastvaeError, ImageError, OutputError
from fastvae.files import write_atomic
from fastvae.model import VAEGAN
from fastvae.state import FORMAT, VERSION, TrainState
from fastvae.state import read_checkpoint as read


def _one_line_error(argv, capsys):
    """The message of a command that must fail with status 2 and a single line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def saved_model(tmp_path):
    model = VAEGAN(Config(latent_dim=4, encoder_widths=(16,), decoder_widths=(16,),
                          discriminator_widths=(16,)))
    TrainState(model).save(tmp_path / "model.npz")
    return tmp_path / "model.npz", model


def test_files_that_are_not_checkpoints_are_refused_by_name(tmp_path, capsys):
    npy = tmp_path / "weights.npy"
    np.save(npy, np.zeros(3))
    listed = tmp_path / "listed.npz"
    write_archive(listed, [1, 2, 3], {"a": np.zeros(2)})
    cases = {npy: "holds a single array (.npy)", listed: "its header is not a JSON object"}
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read(path)
        assert message in _one_line_error(["sample", "--checkpoint", str(path)], capsys)


def test_a_checkpoint_header_without_its_config_is_called_damaged(tmp_path, capsys):
    path = tmp_path / "headless.npz"
    write_archive(path, {"format": FORMAT, "version": VERSION, "sha256": "", "extra": {}}, {})
    err = _one_line_error(["sample", "--checkpoint", str(path)], capsys)
    assert "is damaged: its header lacks config, step_counts, noise_rng" in err


def test_a_checkpoint_of_non_finite_parameters_is_refused_everywhere(saved_model, tmp_path,
                                                                     capsys):
    _, model = saved_model
    model.params["decoder"][3] = np.nan
    bad = tmp_path / "diverged.npz"
    TrainState(model).save(bad)
    for argv in (["sample"], ["reconstruct", "--indices", "0"], ["evaluate", "--limit", "4"]):
        err = _one_line_error(argv + ["--checkpoint", str(bad), "--output", str(tmp_path / "o.png")]
                              if argv[0] != "evaluate" else argv + ["--checkpoint", str(bad)],
                              capsys)
        assert "non-finite parameters in the decoder" in err
    assert not (tmp_path / "o.png").exists()


def test_an_image_over_pils_pixel_limit_is_an_image_error(tmp_path, monkeypatch):
    Image.new("L", (120, 100), 255).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    for limit in (100 * 100, 120 * 100 // 2 + 1):   # over 2x the limit: error; over 1x: warning
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageError, match="too large to decode safely"):
                images.load_digit(tmp_path / "big.png")


def _stroke(picture, colour):
    from PIL import ImageDraw
    ImageDraw.Draw(picture).line([(30, 10), (50, 50), (70, 12)], fill=colour, width=7)
    return picture


def test_white_ink_on_a_transparent_background_is_a_digit(tmp_path):
    _stroke(Image.new("RGBA", (100, 60), (255, 255, 255, 0)), (255, 255, 255, 255)).save(
        tmp_path / "white.png")
    _stroke(Image.new("RGBA", (100, 60), (0, 0, 0, 0)), (0, 0, 0, 255)).save(
        tmp_path / "black.png")
    white, black = images.load_digit(tmp_path / "white.png"), images.load_digit(tmp_path / "black.png")
    assert white.max() == pytest.approx(1.0) and (white > 0.5).sum() > 20
    np.testing.assert_allclose(white, black, atol=1e-6)


def test_an_output_is_written_in_the_format_its_suffix_names(saved_model, tmp_path, capsys):
    path, _ = saved_model
    for name, magic in (("s.jpg", b"\xff\xd8\xff"), ("s.png", b"\x89PNG"), ("s.bmp", b"BM")):
        assert cli.main(["sample", "--checkpoint", str(path), "-n", "4",
                         "--output", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes().startswith(magic), name
    err = _one_line_error(["sample", "--checkpoint", str(path), "--output",
                           str(tmp_path / "s.xyz")], capsys)
    assert "no image format that can be saved ends in '.xyz'" in err


def test_sample_draws_at_most_one_pictures_worth(saved_model, tmp_path, capsys):
    path, _ = saved_model
    err = _one_line_error(["sample", "--checkpoint", str(path), "-n", "1025", "--output",
                           str(tmp_path / "s.png")], capsys)
    assert "-n must lie in 1..1024, got 1025" in err and not (tmp_path / "s.png").exists()


def test_output_paths_without_a_name_or_under_a_file_are_named(saved_model, tmp_path, capsys):
    path, _ = saved_model
    (tmp_path / "a-file").write_text("not a folder")
    cases = {"": "no file name in the output path ''",
             str(tmp_path / "a-file" / "s.png"): f"{tmp_path / 'a-file'} is a file, not a folder"}
    for output, message in cases.items():
        assert message in _one_line_error(["sample", "--checkpoint", str(path), "--output",
                                           output], capsys)
    with pytest.raises(OutputError):
        write_atomic(tmp_path / "a-file" / "x" / "y.json", lambda file: file.write(b"{}"))
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_an_empty_fastvae_backend_counts_as_unset_like_fastvae_data():
    script = ("from fastvae.backend import get_backend, default_backend_name;"
              "from fastvae.data import default_data_dir;"
              "print(get_backend().name == default_backend_name(), default_data_dir().name)")
    env = {"FASTVAE_BACKEND": "", "FASTVAE_DATA": "", "PATH": "/usr/bin:/bin",
           "HOME": "/nonexistent-home"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "fastvae"]  # the default backend, not an error


def test_bench_without_the_dev_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytest_benchmark", None)   # as if not installed
    err = _one_line_error(["bench", "--quick", "--json", "/nonexistent/x.json"], capsys)
    assert "needs pytest and pytest-benchmark" in err and "pip install 'fastvae[dev]'" in err
    assert issubclass(OutputError, FastvaeError)


def test_warnings_never_print_before_the_one_line_message(tmp_path, mnist_dir):
    argv = [sys.executable, "-m", "fastvae", "train", "--run-dir", str(tmp_path), "--data-dir",
            str(mnist_dir), "--quiet", "--epochs", "1", "--train-limit", "64", "--test-limit",
            "16", "--batch-size", "16", "--latent-dim", "4", "--encoder-widths", "16",
            "--decoder-widths", "16", "--discriminator-widths", "16", "--lr-decoder", "1e30",
            "--lr-discriminator", "1e30"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "diverged" in done.stderr, done.stderr
    assert json.dumps(done.stderr).count("Warning") == 0
