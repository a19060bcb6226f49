import csv
import dataclasses

import numpy as np
import pytest
from PIL import Image

from fastvae import cli, kernels
from fastvae.config import Config
from fastvae.trainer import PICTURES, Trainer

SMALL = ["--train-limit", "256", "--test-limit", "64", "--batch-size", "32", "--latent-dim", "8",
         "--encoder-widths", "64", "32", "--decoder-widths", "32", "64",
         "--discriminator-widths", "64", "16"]


def small_config(**overrides):
    values = dict(train_limit=256, test_limit=64, batch_size=32, latent_dim=8,
                  encoder_widths=(64, 32), decoder_widths=(32, 64),
                  discriminator_widths=(64, 16))
    values.update(overrides)
    return Config(**values)


def test_train_reconstruct_sample_end_to_end(tmp_path, mnist_dir, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run), "--data-dir", str(mnist_dir), "--quiet",
                     "--epochs", "2", *SMALL]) == 0
    for name in PICTURES + ("metrics.csv", "checkpoint.npz"):
        assert (run / name).stat().st_size > 0, name
    with Image.open(run / "real.png") as real:
        # 64 images in 8 columns of 28 px + 2 px padding, scaled 4x, plus a title band
        assert real.width == (8 * 30 + 2) * 4 and real.height > (8 * 30 + 2) * 4
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["reconstruction"]) < float(rows[0]["reconstruction"])
    assert all(np.isfinite(float(r["test_bce"])) for r in rows)

    output = tmp_path / "recon.png"
    assert cli.main(["reconstruct", "--checkpoint", str(run / "checkpoint.npz"), "--data-dir",
                     str(mnist_dir), "--indices", "3", "4", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "test[3]" in printed and "test[4]" in printed
    with Image.open(output) as picture:
        assert picture.width == (2 * 30 + 2) * 4

    digit = tmp_path / "digit.png"
    Image.fromarray(np.pad(np.full((12, 6), 255, np.uint8), 8)).save(digit)
    assert cli.main(["reconstruct", "--checkpoint", str(run / "checkpoint.npz"),
                     "--images", str(digit), "--output", str(output)]) == 0
    assert str(digit) in capsys.readouterr().out

    samples = tmp_path / "samples.png"
    assert cli.main(["sample", "--checkpoint", str(run / "checkpoint.npz"), "-n", "9",
                     "--output", str(samples)]) == 0
    with Image.open(samples) as picture:
        assert picture.width == (3 * 30 + 2) * 4


def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(tmp_path, mnist_dir):
    straight = Trainer(small_config(epochs=2), tmp_path / "a", mnist_dir, progress=False).fit()
    Trainer(small_config(epochs=1), tmp_path / "b", mnist_dir, progress=False).fit()
    resumed = Trainer(small_config(epochs=2), tmp_path / "b", mnist_dir,
                      progress=False).fit(resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
                          for r in rows]
    assert strip(resumed) == strip(straight)


@pytest.mark.parametrize("mode", ["vaegan", "vae"])
def test_progress_bar_shows_the_discriminator_only_where_there_is_one(tmp_path, mnist_dir,
                                                                     capsys, mode):
    Trainer(small_config(epochs=1, mode=mode), tmp_path, mnist_dir, log_every=2).fit()
    shown = capsys.readouterr().err
    assert "rec=" in shown and ("disc=" in shown) == (mode == "vaegan")
    assert "nan" not in shown


def test_config_file_with_flag_override(tmp_path):
    settings = tmp_path / "run.toml"
    settings.write_text('latent_dim = 32\ngamma = 0.5\nencoder_widths = [300, 100]\n')
    args = cli.make_parser().parse_args(["train", "--config", str(settings), "--gamma", "2.5"])
    config = cli.build_config(args)
    assert config.latent_dim == 32 and config.gamma == 2.5
    assert config.encoder_widths == (300, 100) and config.batch_size == Config().batch_size


@pytest.mark.parametrize("argv, message", [
    (["train", "--latent-dim", "0"], "--latent-dim must be at least 1"),
    (["train", "--lr-encoder", "-1"], "learning rates must be positive (--lr-encoder)"),
    (["train", "--activation", "swish"], "unknown activation 'swish'"),
    (["train", "--backend", "tpu"], "unknown backend 'tpu'"),
    (["train", "--config", "/nonexistent/run.toml"], "No such file"),
    (["sample", "--checkpoint", "/nonexistent.npz"], "does not exist"),
    (["sample", "--checkpoint", "/nonexistent.npz", "-n", "0"], "-n must lie in 1..1024"),
])
def test_user_errors_give_one_line_and_exit_status_2(argv, message, capsys, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mnist").mkdir(parents=True)  # a run from the quick start, say
    (tmp_path / "runs" / "mnist" / "checkpoint.npz").write_bytes(b"")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_batch_larger_than_the_dataset_is_refused(tmp_path, mnist_dir, capsys):
    argv = ["train", "--run-dir", str(tmp_path), "--data-dir", str(mnist_dir), "--quiet",
            "--train-limit", "100", "--batch-size", "128"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "batch_size 128 is larger than the 100 training images: lower --batch-size" in err


def test_library_errors_name_settings_and_the_cli_names_flags(tmp_path, mnist_dir):
    """The library speaks of `batch_size` (a Config name); only the CLI says --batch-size."""
    from fastvae.errors import TrainingError
    trainer = Trainer(small_config(batch_size=128, train_limit=100), tmp_path, mnist_dir,
                      progress=False)
    with pytest.raises(TrainingError, match="lower `batch_size`"):
        trainer.fit()
    assert cli.as_flags("lower `batch_size` or `lr_encoder`") == "lower --batch-size or --lr-encoder"


def test_a_bug_is_not_turned_into_a_user_error(tmp_path, monkeypatch):
    """Only the FastvaeError family is a one-line user error: a ValueError, KeyError or
    OSError from a bug propagates with its traceback."""
    for bug in (ValueError("a bug"), KeyError("a bug"), OSError("a bug")):
        def broken(self, resume=False, overwrite=False, bug=bug):
            raise bug
        monkeypatch.setattr(Trainer, "fit", broken)
        with pytest.raises(type(bug), match="a bug"):
            cli.main(["train", "--run-dir", str(tmp_path), "--quiet"])


def test_gradcheck_command_prints_its_table_and_passes(capsys):
    assert cli.main(["gradcheck", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "vaegan/pixel: discriminator loss" in out and "0 failed" in out


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "fastvae", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "reconstruct" in result.stdout


def test_a_diverging_run_stops_naming_the_network_and_keeps_the_checkpoint(tmp_path, mnist_dir,
                                                                           capsys):
    run = ["train", "--run-dir", str(tmp_path), "--data-dir", str(mnist_dir), "--quiet", *SMALL]
    assert cli.main(run + ["--epochs", "1"]) == 0
    saved = (tmp_path / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    assert cli.main(run + ["--epochs", "2", "--resume", "--lr-discriminator", "1e30"]) == 2
    err = capsys.readouterr().err      # a resume may change the learning rates: this one diverges
    assert "non-finite" in err and "--resume continues it" in err
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved
    fresh = tmp_path / "fresh"
    status = cli.main(["train", "--run-dir", str(fresh), "--data-dir", str(mnist_dir), "--quiet",
                       *SMALL, "--epochs", "1", "--lr-discriminator", "1e30",
                       "--lr-decoder", "1e30"])
    err = capsys.readouterr().err
    assert status == 2 and "non-finite" in err and "learning rate" in err
    assert "Traceback" not in err
    assert not (fresh / "checkpoint.npz").exists()
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved


def test_gradient_clipping_bounds_each_networks_gradient_norm(mnist_subset):
    from fastvae.model import VAEGAN
    from fastvae.state import TrainState
    model = VAEGAN(small_config(clip_grad_norm=0.5))
    state = TrainState(model)
    x = model.backend.asarray(mnist_subset[:32])
    model.compute_gradients(x)
    assert max(float(np.linalg.norm(g)) for g in model.grads.values()) > 0.5
    state._apply_updates()
    for grads in model.grads.values():
        assert float(np.linalg.norm(grads)) <= 0.5 * (1 + 1e-5)


def test_more_bad_inputs_each_get_their_message(tmp_path, mnist_dir, capsys, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not an image")
    run = tmp_path / "run"
    train = ["train", "--data-dir", str(mnist_dir), "--quiet", "--epochs", "1", *SMALL]
    assert cli.main([*train, "--run-dir", str(run)]) == 0
    cases = [
        ([*train, "--run-dir", str(a_file)], "is a file"),
        (["reconstruct", "--checkpoint", str(run / "checkpoint.npz"), "--images", str(a_file)],
         str(a_file)),
        (["reconstruct", "--checkpoint", str(run / "checkpoint.npz"), "--data-dir",
          str(mnist_dir), "--indices", "10000"], "indices must lie in 0..9999"),
        (["sample", "--checkpoint", str(a_file)], "not a readable checkpoint"),
    ]
    if "cupy" not in kernels.available():  # where there is a GPU, cupy trains
        cases.append(([*train, "--run-dir", str(tmp_path / "x"), "--backend", "cupy"],
                      "backend 'cupy'"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)

    saved = (run / "checkpoint.npz").read_bytes()

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fastvae.files.os.fsync", disk_full)
    assert cli.main([*train, "--run-dir", str(run), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous version" in err
    assert (run / "checkpoint.npz").read_bytes() == saved
    assert not list(run.glob(".*.tmp"))


def test_every_setting_flag_explains_itself(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--latent-dim LATENT_DIM size of z, and of the mu and log-variance heads (32 "
            "with the mixture prior: docs/evaluation.md) (default 32)") in text
    assert ("--prior PRIOR what decoded samples are drawn from: normal (N(0, I)), or mixture: a "
            "Gaussian mixture fitted after training") in text
    assert "--lr-decoder LR_DECODER learning rate of the decoder's optimizer" in text
    assert "---" not in text
    comments = cli.field_comments()
    missing = [f.name for f in dataclasses.fields(Config)
               if f.name != "extras" and not comments.get(f.name)]
    assert not missing, f"settings without a comment: {missing}"


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path, mnist_dir, capsys):
    train = ["train", "--run-dir", str(tmp_path), "--data-dir", str(mnist_dir), "--quiet",
             "--epochs", "1", *SMALL]
    assert cli.main(train) == 0
    saved = (tmp_path / "checkpoint.npz").read_bytes()
    assert cli.main(train) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved
    assert cli.main(train + ["--overwrite", "--seed", "1"]) == 0
    assert (tmp_path / "checkpoint.npz").read_bytes() != saved
