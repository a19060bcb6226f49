"""Sweeps on Optuna: the search space, counting trials, the report, and real sweeps of tiny
trainings on the journal file and on a throw-away PostgreSQL server."""
import csv
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastvae import sweep
from fastvae.config import Config
from fastvae.errors import ConfigError
from fastvae.sweep import Objective, Param, SweepSettings, parse_objective, parse_param
from fastvae.sweep_report import dominates, pareto_ranks
from fastvae.trainer import saved_config

TINY = Config(latent_dim=4, encoder_widths=(16,), decoder_widths=(16,),
              discriminator_widths=(16,), epochs=1, batch_size=64, train_limit=256,
              test_limit=128, backend="numpy")
EVAL = dict(eval_images=200, eval_k=1, kid_subsets=2, classifier_epochs=1)


# ----- the search space (no Optuna needed) -----

def test_parse_param_reads_every_kind():
    assert parse_param("gamma=log:0.01:10") == Param("gamma", "log", 0.01, 10.0)
    assert parse_param("latent-dim=int:8:128") == Param("latent_dim", "int", 8, 128)
    assert parse_param("latent_dim=logint:8:128").kind == "logint"
    assert parse_param("lr_decoder=float:1e-4:1e-3") == Param("lr_decoder", "float", 1e-4, 1e-3)
    assert parse_param("reconstruction=choice:pixel,feature").choices == ("pixel", "feature")
    assert parse_param("cuda_graph=choice:true,false").choices == (True, False)
    assert parse_param("batch_size=choice:64,128").choices == (64, 128)
    for text in ("gamma=log:0.01:10", "reconstruction=choice:pixel,feature"):
        assert parse_param(parse_param(text).text()) == parse_param(text)


@pytest.mark.parametrize("text, complaint", [
    ("gama=log:0.1:1", "not a setting"),
    ("encoder_widths=int:8:64", "several numbers"),
    ("gamma=normal:0:1", "KIND"),
    ("gamma", "KIND"),
    ("gamma=log:0:1", "LOW > 0"),
    ("gamma=float:2:1", "LOW < HIGH"),
    ("gamma=float:a:b", "two numbers"),
    ("latent_dim=int:8.5:64", "whole numbers"),
    ("gamma=int:1:4", "not a whole number"),
    ("batch_size=choice:64,big", "takes a int"),
    ("cuda_graph=choice:yes", "true or false"),
])
def test_parse_param_names_the_mistake(text, complaint):
    with pytest.raises(ConfigError, match=complaint):
        parse_param(text)


def test_objectives_default_directions_and_unknown_metrics():
    assert parse_objective("fid_samples") == Objective("fid_samples", "minimize")
    assert parse_objective("classifier_accuracy_reconstructions").direction == "maximize"
    assert parse_objective("reconstruction_bce:max").direction == "maximize"
    with pytest.raises(ConfigError, match="unknown objective 'fid'"):
        parse_objective("fid")
    with pytest.raises(ConfigError, match="min or max"):
        parse_objective("fid_samples:down")


def test_settings_round_trip_and_differences():
    settings = SweepSettings(TINY, ["gamma=log:0.01:10"], (), **EVAL)
    assert [o.metric for o in settings.objectives] == list(sweep.DEFAULT_OBJECTIVES)
    again = SweepSettings.from_dict(settings.to_dict())
    assert again.to_dict() == settings.to_dict() and not again.differences(settings)
    other = SweepSettings(TINY.replace(epochs=2, backend="numba"), ["gamma=log:0.1:10"], (),
                          **EVAL)
    found = other.differences(settings)
    assert len(found) == 2 and any("epochs 1 -> 2" in f for f in found)  # backend may differ
    with pytest.raises(ConfigError, match="at least one parameter"):
        SweepSettings(TINY, [], ())
    with pytest.raises(ConfigError, match="swept twice"):
        SweepSettings(TINY, ["gamma=log:0.1:1", "gamma=float:0.1:1"], ())


def test_sweep_file_holds_settings_and_a_sweep_table(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('epochs = 3\n[sweep]\nobjectives = ["fid_samples"]\neval_images = 500\n'
                    '[sweep.params]\ngamma = "log:0.01:10"\nlatent_dim = "int:8:64"\n')
    values, table = sweep.read_sweep_file(path)
    assert values == {"epochs": 3}
    assert table == {"space": ["gamma=log:0.01:10", "latent_dim=int:8:64"],
                     "objectives": ["fid_samples"], "eval_images": 500}
    path.write_text("[sweep]\nworkerz = 2\n")
    with pytest.raises(ConfigError, match="unknown keys in \\[sweep\\]: workerz"):
        sweep.read_sweep_file(path)
    path.write_text("epochs = \n")
    with pytest.raises(ConfigError, match="cannot read"):
        sweep.read_sweep_file(path)



@pytest.mark.parametrize("path", ["docs/sweep.toml", "bench/sweep_speed.toml"])
def test_the_shipped_sweep_files_are_valid_sweeps(path):
    """The files the docs and bench/sweep_speed.sh run make a Config and a search space."""
    root = Path(__file__).resolve().parents[1]
    values, table = sweep.read_sweep_file(root / path)
    settings = SweepSettings(Config(**values), table.pop("space"), (), **table)
    assert settings.space and settings.config.backend == "numba"
    if path.startswith("bench"):   # the speed-up needs trials of equal cost: gamma alone
        assert [param.name for param in settings.space] == ["gamma"]

def test_pareto_ranks_sort_fronts():
    points = [[1, 5], [2, 2], [5, 1], [3, 3], [4, 4], [2, 2]]
    assert pareto_ranks(points) == [1, 1, 1, 2, 3, 1]
    assert dominates([1, 1], [1, 2]) and not dominates([1, 2], [1, 2])
    assert pareto_ranks([[3], [1], [2]]) == [3, 1, 2]


def test_missing_optuna_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(sweep.FastvaeError, match=r"pip install 'fastvae-numpy\[sweep\]'"):
        sweep.Sweep("unused")


def test_training_and_the_cli_never_import_optuna():
    code = ("import sys, fastvae, fastvae.trainer, fastvae.cli, fastvae.sweep;"
            "fastvae.cli.make_parser(); assert 'optuna' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----- counting: retried failures and surplus trials do not count -----

def test_counted_skips_retried_and_surplus_trials():
    optuna = pytest.importorskip("optuna")
    study = optuna.create_study()
    make = optuna.trial.create_trial
    study.add_trial(make(state=optuna.trial.TrialState.FAIL))                      # 0: retried
    study.add_trial(make(value=1.0))                                               # 1
    study.add_trial(make(state=optuna.trial.TrialState.FAIL))                      # 2: failed
    study.add_trial(make(state=optuna.trial.TrialState.PRUNED,
                         user_attrs={"surplus": True}))                            # 3
    study.add_trial(make(state=optuna.trial.TrialState.WAITING,
                         system_attrs={"failed_trial": 0}))                        # 4: retry of 0
    trials = study.get_trials()
    assert [t.number for t in sweep.counted(trials)] == [4, 1, 2]
    assert sweep.progress(trials) == {"done": 1, "failed": 1, "running": 0, "waiting": 1}


# ----- real sweeps on the journal file -----

@pytest.fixture(scope="module")
def quick_classifier(mnist_dir, tmp_path_factory):
    """A 1-epoch classifier on 2,000 images placed in a private cache as the one the sweeps
    load (its architecture is the real one; training it on all 60,000 would take long)."""
    from fastvae import classifier, data
    folder = tmp_path_factory.mktemp("sweep-cache")
    images, labels = data.load_split("mnist", "train", mnist_dir, download=False, limit=2000)
    model = classifier.train_classifier(images, labels, epochs=1, backend="numpy")
    model.save(classifier.cache_path(classifier.ClassifierSettings(epochs=1), folder))
    return folder


@pytest.fixture
def sweep_env(quick_classifier, mnist_dir, monkeypatch):
    """The environment every worker inherits: the cache, the data, no thread pinning."""
    pytest.importorskip("optuna")
    monkeypatch.setenv("FASTVAE_CACHE", str(quick_classifier))
    monkeypatch.setenv("FASTVAE_DATA", str(mnist_dir))
    for name in sweep.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return mnist_dir


def tiny_settings(space=("gamma=log:0.01:10", "latent_dim=int:2:8"), config=TINY):
    return SweepSettings(config, list(space), (), **EVAL)


def test_two_workers_record_each_trial_once_and_rerunning_adds_the_difference(sweep_env,
                                                                              tmp_path):
    runner = sweep.Sweep(tmp_path, data_dir=sweep_env, download=False)
    lines = []
    runner.run(tiny_settings(), trials=4, workers=2, report=lines.append)
    trials = runner.trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2   # both workers trained
    shared_out = str(max(1, os.cpu_count() // 2))       # each worker pinned to its cores
    assert {t.user_attrs["worker"]["threads"] for t in trials} == {shared_out}
    assert "NUMBA_NUM_THREADS" not in os.environ        # only the workers were pinned
    for trial in trials:
        run_dir = tmp_path / "trials" / f"{trial.number:04d}"
        assert (run_dir / "checkpoint.npz").is_file() and (run_dir / "samples.png").is_file()
        saved = saved_config(run_dir)
        assert saved.gamma == trial.params["gamma"]
        assert saved.latent_dim == trial.params["latent_dim"]
        assert trial.values == [trial.user_attrs["metrics"]["reconstruction_bce"],
                                trial.user_attrs["metrics"]["fid_samples"]]
    assert lines[-1].startswith("sweep fastvae: 4/4 finished (0 failed)")

    runner.run(None, trials=4, workers=2, report=lines.append)      # joins, nothing to do
    assert len(runner.trials()) == 4 and lines[-1].endswith("nothing to do")
    runner.run(tiny_settings(), trials=5, workers=2, report=lines.append)
    trials = runner.trials()
    assert sorted(t.number for t in sweep.counted(trials)) == [0, 1, 2, 3, 4]
    assert [t.state.name for t in sweep.counted(trials)] == ["COMPLETE"] * 5

    with pytest.raises(ConfigError, match="other settings.*epochs 1 -> 2"):
        runner.run(tiny_settings(config=TINY.replace(epochs=2)), trials=6)


def test_a_failing_trial_is_recorded_and_the_rest_go_on(sweep_env, tmp_path):
    runner = sweep.Sweep(tmp_path, data_dir=sweep_env, download=False)
    study, _ = runner.study(tiny_settings(["reconstruction=choice:pixel,feature"],
                                          TINY.replace(mode="vae")))
    study.enqueue_trial({"reconstruction": "feature"})    # impossible without a discriminator
    study.enqueue_trial({"reconstruction": "pixel"})
    runner.work(trials=2)                                 # one worker, in this process
    failed, done = runner.trials()
    assert failed.state.name == "FAIL" and done.state.name == "COMPLETE"
    assert "feature reconstruction needs the discriminator" in failed.user_attrs["error"]
    assert sweep.progress(runner.trials()) == {"done": 1, "failed": 1, "running": 0,
                                                "waiting": 0}


def test_a_trial_whose_worker_died_is_failed_and_retried(sweep_env, tmp_path):
    """The journal has no heartbeat: a running trial whose process is gone from this machine
    is failed, and retried with its settings."""
    import socket
    optuna = pytest.importorskip("optuna")
    runner = sweep.Sweep(tmp_path, data_dir=sweep_env, download=False)
    study, _ = runner.study(tiny_settings())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    space = {"gamma": optuna.distributions.FloatDistribution(0.01, 10, log=True),
             "latent_dim": optuna.distributions.IntDistribution(2, 8)}
    host = socket.gethostname()
    lost, claimed = study.ask(space), study.ask(space)
    lost.set_user_attr("worker", {"host": host, "pid": dead.pid, "trial": 0})
    # a retry starts with its original's attributes until its worker writes its own
    claimed.set_user_attr("worker", {"host": host, "pid": dead.pid, "trial": 0})
    runner.fail_lost_trials(study)
    assert [t.state.name for t in runner.trials()] == ["FAIL", "RUNNING", "WAITING"]
    study.tell(claimed, state=optuna.trial.TrialState.FAIL)
    runner.work(trials=2)
    first, _, retry = runner.trials()
    assert f"{dead.pid} died" in first.user_attrs["error"]
    assert retry.state.name == "COMPLETE" and retry.system_attrs["failed_trial"] == 0
    assert retry.params == first.params
    assert [t.number for t in sweep.counted(runner.trials())] == [2, 1]


def test_ctrl_c_stops_every_worker_and_the_same_command_reruns_the_interrupted(sweep_env,
                                                                             tmp_path):
    command = [sys.executable, "-m", "fastvae", "sweep", "--run-dir", str(tmp_path),
               "--param", "gamma=log:0.01:10", "--trials", "2", "--workers", "2",
               "--data-dir", str(sweep_env), "--no-download", "--eval-images", "200",
               "--kid-subsets", "2", "--classifier-epochs", "1", "--latent-dim", "4",
               "--encoder-widths", "16", "--decoder-widths", "16", "--discriminator-widths",
               "16", "--epochs", "1", "--batch-size", "32", "--train-limit", "8000",
               "--test-limit", "128", "--backend", "numpy"]
    sweep_run = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    runner, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        if (tmp_path / sweep.JOURNAL).exists():
            runner = runner or sweep.Sweep(tmp_path)
            if sweep.progress(runner.storage.get_all_trials(0))["running"] == 2:
                break
        time.sleep(0.2)
    time.sleep(0.2)
    os.killpg(sweep_run.pid, signal.SIGINT)        # what Ctrl-C in a terminal does
    out, err = sweep_run.communicate(timeout=60)
    assert sweep_run.returncode == 130, err
    assert "interrupted; the interrupted trials run again" in err
    states = {t.number: t for t in runner.trials()}
    assert [t.state.name for t in states.values()] == ["FAIL", "FAIL", "WAITING", "WAITING"], \
        [(t.state.name, t.user_attrs) for t in states.values()]
    assert {states[n].params["gamma"] for n in (0, 1)} == \
        {states[n].params["gamma"] for n in (2, 3)}
    assert all(states[n].user_attrs["error"] == sweep.INTERRUPTED for n in (0, 1))
    assert subprocess.run(command, capture_output=True).returncode == 0
    kept = sweep.counted(runner.trials())
    assert [t.state.name for t in kept] == ["COMPLETE"] * 2
    assert sorted(t.system_attrs["failed_trial"] for t in kept) == [0, 1]


def test_cli_sweep_and_show_write_the_table_csv_and_front(sweep_env, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastvae import cli
    flags = ["--run-dir", str(tmp_path), "--data-dir", str(sweep_env), "--no-download",
             "--eval-images", "200", "--kid-subsets", "2", "--classifier-epochs", "1"]
    tiny = ["--latent-dim", "4", "--encoder-widths", "16", "--decoder-widths", "16",
            "--discriminator-widths", "16", "--epochs", "1", "--batch-size", "64",
            "--train-limit", "256", "--test-limit", "128", "--backend", "numpy"]
    assert cli.main(["sweep", *flags, *tiny, "--param", "gamma=log:0.01:10",
                     "--trials", "2", "--threads", "1"]) == 0
    assert cli.main(["sweep", "--run-dir", str(tmp_path), "--show"]) == 0
    out = capsys.readouterr().out
    assert "2 done, 0 failed, 0 running" in out and "rank" in out
    with open(tmp_path / "trials.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted(int(r["trial"]) for r in rows) == [0, 1]
    assert {r["state"] for r in rows} == {"done"} and all(r["fid_samples"] for r in rows)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert cli.main(["sweep", "--run-dir", str(tmp_path / "none"), "--show"]) == 2
    assert "no sweep 'fastvae'" in capsys.readouterr().err
    assert cli.main(["sweep", "--run-dir", str(tmp_path), "--param", "gamma=log:0:1",
                     "--trials", "3"]) == 2
    assert "LOW > 0" in capsys.readouterr().err


# ----- many machines: a PostgreSQL server on loopback -----

def _free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL cluster (initdb and pg_ctl into a temporary folder, a free
    port, as the `postgres` user when this is root); skips, saying why, where none starts."""
    import glob
    import shutil
    import tempfile
    pytest.importorskip("optuna")
    pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install 'psycopg[binary]'")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or \
        [shutil.which("initdb")] * bool(shutil.which("initdb"))
    if not found:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    bin_dir = os.path.dirname(found[-1])
    as_user = []
    folder = tempfile.mkdtemp(prefix="fastvae-pg-")
    if os.geteuid() == 0:              # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start postgres as its user")
        try:
            import pwd
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server")
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(folder, "data"), _free_port()

    def pg(*command):
        return subprocess.run(as_user + [os.path.join(bin_dir, command[0]), *command[1:]],
                              capture_output=True, text=True, timeout=60)

    made = pg("initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    if made.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
    started = pg("pg_ctl", "-D", data, "-l", os.path.join(folder, "log"), "-w", "-t", "30",
                 "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off",
                 "start")
    if started.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"pg_ctl could not start PostgreSQL: {started.stderr.strip()[-300:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_postgres_two_workers_one_killed_mid_trial_none_lost_none_duplicated(
        sweep_env, postgres_url, tmp_path):
    trials = 4
    runner = sweep.Sweep(tmp_path, postgres_url, "killed", heartbeat=1, data_dir=sweep_env,
                         download=False)
    runner.study(tiny_settings())
    context = multiprocessing.get_context("spawn")
    arguments = (str(tmp_path), postgres_url, "killed", 1, 3, str(sweep_env), False, {}, trials)
    workers = [context.Process(target=sweep._worker_main, args=arguments) for _ in range(2)]
    with sweep._thread_environment(1):
        for worker in workers:
            worker.start()
    victim, deadline = workers[0], time.monotonic() + 60
    while time.monotonic() < deadline:           # kill the first worker in its first trial
        running = [t for t in runner.trials() if t.state.name == "RUNNING" and t.params
                   and t.user_attrs.get("worker", {}).get("pid") == victim.pid]
        if running:
            break
        time.sleep(0.1)
    assert running, "the first worker never started a trial"
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    workers[1].join(120)
    assert workers[1].exitcode == 0
    every = runner.trials()
    lost = [t for t in every if t.number == running[0].number][0]
    assert lost.state.name == "FAIL"                       # failed by the missing heartbeat
    kept = sweep.counted(every)
    assert len(kept) == trials and all(t.state.name == "COMPLETE" for t in kept)
    retries = [t for t in kept if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retries) == 1 and retries[0].params == lost.params
    assert len({t.number for t in kept}) == trials         # none duplicated
    assert {t.number for t in every} == {t.number for t in kept} | {lost.number}  # none lost
    assert np.isfinite([v for t in kept for v in t.values]).all()
