"""One run directory, one training: no second start harms the first, no bad state is saved."""
import csv
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from run_helpers import SMALL, SMALL_FLAGS, train_process, wait_for

from fastvae import cli, rundir
from fastvae.config import Config
from fastvae.errors import ConfigError, TrainingError
from fastvae.schedule import lr_factor
from fastvae.state import TrainState
from fastvae.state import read_checkpoint as read
from fastvae.trainer import CHECKPOINT, METRICS, Trainer


def _trainer(run_dir, mnist_dir, **overrides):
    return Trainer(Config(**{**SMALL, **overrides}), run_dir, mnist_dir, progress=False)


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_an_interrupt_after_divergence_keeps_the_last_good_checkpoint(tmp_path, mnist_dir,
                                                                      monkeypatch):
    run = _trainer(tmp_path, mnist_dir, epochs=2)       # 10 steps an epoch, checked every 50
    original_step, calls = TrainState.step, []

    def diverge_then_stop(state, x):
        losses = original_step(state, x)
        calls.append(1)
        if len(calls) == 13:                            # epoch 2, step 3
            state.model.params["encoder"][...] = np.nan
            run.request_stop()
        return losses

    monkeypatch.setattr(TrainState, "step", diverge_then_stop)
    with pytest.raises(TrainingError, match="non-finite parameters in the encoder.*is kept"):
        run.fit()
    header, arrays = read(tmp_path / CHECKPOINT)
    assert header["extra"]["epoch"] == 1 and header["extra"]["partial"] is None
    assert all(np.isfinite(value).all() for value in arrays.values())


def test_a_resume_may_lower_the_learning_rate_and_clip_and_the_run_records_it(tmp_path,
                                                                            mnist_dir):
    _trainer(tmp_path, mnist_dir, epochs=1).fit()
    resumed = _trainer(tmp_path, mnist_dir, epochs=2, lr_encoder=1e-4, clip_grad_norm=5.0)
    resumed.fit(resume=True)
    assert resumed.state.base_lr["encoder"] == 1e-4   # the schedule's last epoch scales it
    assert resumed.state.optimizers["encoder"].lr == 1e-4 * lr_factor(
        Config().lr_schedule, Config().lr_final, 1, 2)
    header, _ = read(tmp_path / CHECKPOINT)
    changes = header["extra"]["setting_changes"]
    assert [(c["epoch"], c["setting"], c["from"], c["to"]) for c in changes] == [
        (1, "lr_encoder", Config().lr_encoder, 1e-4), (1, "clip_grad_norm", 0.0, 5.0)]
    assert header["config"]["lr_encoder"] == 1e-4
    with pytest.raises(TrainingError, match="latent_dim 8 -> 4"):   # the shape may not change
        _trainer(tmp_path, mnist_dir, epochs=3, latent_dim=4).fit(resume=True)


def test_a_second_training_into_a_live_runs_directory_is_refused_and_harms_nothing(
        tmp_path, mnist_dir, capsys):
    first = train_process(tmp_path, mnist_dir, epochs=200)
    wait_for(tmp_path / CHECKPOINT, first, timeout=120)
    notes = tmp_path / ".notes.tmp"
    notes.write_text("the user's own")
    live_temporary = tmp_path / f".samples.png.{first.pid}.0123abcd.tmp"
    live_temporary.write_bytes(b"being written")
    dead_temporary = tmp_path / f".samples.png.{_dead_pid()}.0123abcd.tmp"
    dead_temporary.write_bytes(b"left by a killed run")
    for extra in ([], ["--resume"], ["--overwrite"]):
        status = cli.main(["train", "--run-dir", str(tmp_path), "--data-dir", str(mnist_dir),
                           "--quiet", "--epochs", "1", *SMALL_FLAGS, *extra])
        err = capsys.readouterr().err
        assert status == 2 and f"in use by another training (process {first.pid}" in err, err
    assert notes.exists() and live_temporary.exists() and dead_temporary.exists()
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "checkpoint saved" in err and "could not write" not in err
    live_temporary.unlink()
    epoch = read(tmp_path / CHECKPOINT)[0]["extra"]["epoch"]
    assert cli.main(["train", "--run-dir", str(tmp_path), "--data-dir", str(mnist_dir), "--quiet",
                     "--resume", "--epochs", str(epoch + 1), *SMALL_FLAGS]) == 0
    assert notes.read_text() == "the user's own" and not dead_temporary.exists()
    assert not (tmp_path / rundir.LOCK).exists()


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    (tmp_path / rundir.LOCK).write_text(f"{_dead_pid()}\n")
    with rundir.claim(tmp_path):
        assert (tmp_path / rundir.LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(TrainingError, match="in use by another training"):
            with rundir.claim(tmp_path):        # the same process twice: still one holder
                pass
    assert not (tmp_path / rundir.LOCK).exists()


def test_metrics_never_list_an_epoch_the_checkpoint_does_not_hold(tmp_path, mnist_dir,
                                                                 monkeypatch):
    run = _trainer(tmp_path, mnist_dir, epochs=2)
    original_save, saves = Trainer.save_checkpoint, []

    def save_once_then_fail(self):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        original_save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_once_then_fail)
    with pytest.raises(OSError):
        run.fit()
    with open(tmp_path / METRICS) as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["1"]
    assert read(tmp_path / CHECKPOINT)[0]["extra"]["epoch"] == 1


def test_a_full_disk_is_found_before_the_first_epoch(tmp_path, mnist_dir, monkeypatch):
    usage = rundir.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage._replace(free=10**6))
    monkeypatch.setattr(TrainState, "step", lambda *args: pytest.fail("trained"))
    with pytest.raises(TrainingError, match="1 MB free.*free some space"):
        _trainer(tmp_path / "run", mnist_dir, epochs=1).fit()


@pytest.mark.skipif(getattr(os, "geteuid", lambda: 1)() == 0,
                    reason="root writes into read-only folders")
def test_an_unwritable_run_directory_is_found_before_the_first_epoch(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o555)
    with pytest.raises(TrainingError, match="cannot write into the run directory"):
        _trainer(run_dir, mnist_dir, epochs=1).fit()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fdinfo"), reason="needs Linux's /proc")
def test_a_folder_no_one_may_write_into_is_refused_before_the_first_epoch(mnist_dir,
                                                                        monkeypatch):
    monkeypatch.setattr(TrainState, "step", lambda *args: pytest.fail("trained"))
    with pytest.raises(TrainingError, match="cannot write into the run directory /proc"):
        _trainer("/proc/self/fdinfo", mnist_dir, epochs=1).fit()   # not even root may


def test_run_directory_mistakes_are_refused_before_training(tmp_path, mnist_dir, capsys):
    train = ["train", "--data-dir", str(mnist_dir), "--quiet", "--epochs", "1", *SMALL_FLAGS]
    cases = {
        "holds no checkpoint to continue": ["--run-dir", str(tmp_path / "typo"), "--resume"],
        "contradict each other": ["--run-dir", str(tmp_path / "a"), "--resume", "--overwrite"],
        "the run directory is empty": ["--run-dir", ""],
        "is not a file, so it cannot be a checkpoint": ["--run-dir", str(tmp_path / "b")],
        "cannot create the run directory": ["--run-dir", str(tmp_path / "file" / "run")],
    }
    (tmp_path / "b" / CHECKPOINT).mkdir(parents=True)
    (tmp_path / "file").write_text("a file, not a folder")
    for message, flags in cases.items():
        assert cli.main(train + flags) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "typo").exists() and not (tmp_path / "a").exists()


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys):
    for flags in (["--latent-dim", "1000000000"], ["--encoder-widths", "1000000000", "8"]):
        assert cli.main(["train", "--run-dir", str(tmp_path / "run"), *flags]) == 2
        assert "more than this machine's" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="more than this machine's .* memory"):
        Trainer(Config(latent_dim=10**9), tmp_path).build_model()
    with pytest.raises(ConfigError, match="lower `latent_dim` or the layer widths"):
        Trainer(Config(encoder_widths=(10**9,)), tmp_path).build_model()


def test_stale_temporaries_are_told_apart_by_their_writers_pid(tmp_path):
    from fastvae.files import temporary_writer, write_atomic
    seen = []
    write_atomic(tmp_path / "x.png", lambda file: seen.extend(os.listdir(tmp_path)))
    assert [temporary_writer(name) for name in seen] == [os.getpid()]
    assert temporary_writer(".notes.tmp") is None
    mine = tmp_path / f".y.png.{os.getpid()}.0123abcd.tmp"
    dead = tmp_path / f".y.png.{_dead_pid()}.0123abcd.tmp"
    for path in (mine, dead, tmp_path / ".notes.tmp"):
        path.write_bytes(b"")
    rundir.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".notes.tmp", mine.name, "x.png"])


def test_a_file_system_without_locks_still_trains_unlocked(tmp_path, monkeypatch):
    def no_locks(descriptor, operation):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with rundir.claim(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == [tmp_path / rundir.LOCK]   # left behind, unheld
