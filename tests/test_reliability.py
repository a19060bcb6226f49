"""A killed or interrupted run loses nothing, and a resumed run is exact."""
import os
import signal
import subprocess
import sys
import time

import pytest
from run_helpers import SMALL, SMALL_FLAGS, train_process, wait_for

from fastvae import cli
from fastvae.state import TrainState, load_model
from fastvae.state import read_checkpoint as read
from fastvae.trainer import CHECKPOINT, Interrupted, Trainer


def _config(**overrides):
    from fastvae.config import Config
    return Config(**{**SMALL, **overrides})


def _without_timing(rows):
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}
            for row in rows]


@pytest.mark.parametrize("overrides", [{}, {"gating": True, "margin": 0.05},
                                       {"lr_schedule": "cosine", "lr_final": 0.1}],
                         ids=["plain", "gated", "scheduled"])
def test_a_run_stopped_mid_epoch_resumes_bit_for_bit(tmp_path, mnist_dir, monkeypatch,
                                                     overrides):
    straight = Trainer(_config(epochs=2, **overrides), tmp_path / "a", mnist_dir,
                       progress=False, log_every=4)
    expected = straight.fit()

    stopped = Trainer(_config(epochs=2, **overrides), tmp_path / "b", mnist_dir,
                      progress=False, log_every=4)
    original_step, calls = TrainState.step, []

    def step_then_stop(state, x):
        calls.append(1)
        if len(calls) == 13:          # epoch 2 (10 steps an epoch), mid logging interval
            stopped.request_stop()
        return original_step(state, x)

    monkeypatch.setattr(TrainState, "step", step_then_stop)
    with pytest.raises(Interrupted, match="epoch 2, step 3 of 10"):
        stopped.fit()
    monkeypatch.setattr(TrainState, "step", original_step)
    resumed = Trainer(_config(epochs=2, **overrides), tmp_path / "b", mnist_dir,
                      progress=False, log_every=4)
    assert _without_timing(resumed.fit(resume=True)) == _without_timing(expected)
    assert resumed.history == straight.history
    for name, params in resumed.model.params.items():
        assert (params == straight.model.params[name]).all()
    counts = resumed.state.steps
    assert counts == straight.state.steps
    if overrides.get("gating"):   # gating skipped some updates, so the counts tell the networks apart
        assert min(counts.values()) < 20 == counts["encoder"]


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_sigterm_and_sighup_save_a_checkpoint_that_resumes(tmp_path, mnist_dir, stop):
    process = train_process(tmp_path, mnist_dir, epochs=200)
    wait_for(tmp_path / CHECKPOINT, process, timeout=60)
    process.send_signal(getattr(signal, stop))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + getattr(signal, stop), err   # 130, 143, 129
    assert "checkpoint saved" in err and "Traceback" not in err
    header, _ = read(tmp_path / CHECKPOINT)
    epoch = header["extra"]["epoch"]
    assert cli.main(["train", "--run-dir", str(tmp_path), "--data-dir", str(mnist_dir),
                     "--quiet", "--resume", "--epochs", str(epoch + 1), *SMALL_FLAGS]) == 0
    assert read(tmp_path / CHECKPOINT)[0]["extra"]["epoch"] == epoch + 1


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    script = ("import sys\n"
              "from fastvae.model import VAEGAN\n"
              "from fastvae.state import TrainState\n"
              "from fastvae.gradcheck import small_config\n"
              "state = TrainState(VAEGAN(small_config(dtype='float32', encoder_widths=(400, 400))))\n"
              "state.save(sys.argv[1]); print('saved', flush=True)\n"
              "while True:\n"
              "    state.save(sys.argv[1])\n")
    path = tmp_path / "model.npz"
    for delay in (0.05, 0.13, 0.31):
        process = subprocess.Popen([sys.executable, "-c", script, str(path)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "saved"
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        load_model(path)                   # complete and checksum-verified
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model.npz"]
    assert all(name.endswith(".tmp") for name in leftovers)


FLAG_VALUES = {
    "--latent-dim": ["0", "-3", "2", "x", "1e9"], "--batch-size": ["0", "-1", "64", "2.5"],
    "--lr-encoder": ["0", "-1e-3", "nan", "1e-3", "abc"], "--gamma": ["-1", "0", "inf", "2"],
    "--activation": ["relu", "swish", ""], "--backend": ["numpy", "tpu", "cupy"],
    "--dtype": ["float16", "float64"], "--epochs": ["-2", "1"], "--mode": ["vae", "gan"],
    "--reconstruction": ["feature", "pixels"], "--encoder-widths": ["0", "64 -1", "32 16"],
    "--betas-decoder": ["0.5 1.5", "0.9 0.99", "0.9"], "--feature-layer": ["7", "-1"],
    "--config": ["/nonexistent.toml"], "--init": ["he", "lecun"],
}


def test_no_train_arguments_end_in_a_traceback(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    empty_data = tmp_path / "no-data"
    empty_data.mkdir()
    flag_value = st.sampled_from(sorted(FLAG_VALUES)).flatmap(
        lambda flag: st.tuples(st.just(flag), st.sampled_from(FLAG_VALUES[flag])))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(flag_value, max_size=4))
    def run(pairs):
        argv = ["train", "--run-dir", str(tmp_path / "run"), "--data-dir", str(empty_data),
                "--no-download", "--quiet"]
        for flag, value in pairs:
            argv += [flag, *value.split()]
        try:
            status = cli.main(argv)
        except SystemExit as exit:       # argparse: usage line and status 2
            status = exit.code
        assert status == 2

    run()
