"""Every setting is checked against its field's type and range, naming the key, before any work."""
import pytest

from fastvae import cli
from fastvae.config import Config
from fastvae.errors import ConfigError

TOML_MISTAKES = {                                  # TOML line: the key the message must name
    "epochs = 1.5": "--epochs must be a whole number",
    "epochs = inf": "--epochs must be a whole number",
    "epochs = true": "--epochs must be a whole number",
    'latent_dim = "8"': "--latent-dim must be a whole number",
    "encoder_widths = 64": "--encoder-widths must be a list",
    'encoder_widths = ["a", "b"]': "--encoder-widths entries must be a whole number",
    "decoder_widths = [32.5]": "--decoder-widths entries must be a whole number",
    'gamma = "high"': "--gamma must be a number",
    "gamma = inf": "--gamma must be a finite number",
    "lr_decoder = nan": "--lr-decoder must be a finite number",
    "clip_grad_norm = -inf": "--clip-grad-norm must be a finite number",
    "betas_encoder = [0.5]": "--betas-encoder takes exactly 2 values",
    "betas_encoder = [0.5, 0.9, 0.99]": "--betas-encoder takes exactly 2 values",
    "device_noise = 1": "--device-noise must be true or false",
    "activation = 3": "--activation must be a string",
    "extras = {when = 2024-01-01}": "extras must hold only",
    "extras = 5": "extras must be a table",
    "seed = -1": "--seed must be non-negative",
    "test_limit = 1": "--test-limit must be 0 (all) or at least 2",
    "colour = 'blue'": "unknown config keys: colour",
    "epochs = = 2": "is not valid TOML",
}


@pytest.fixture
def train_argv(tmp_path):
    """`fastvae train` into an empty data folder: a setting that passes fails on the data."""
    (tmp_path / "no-data").mkdir()
    return ["train", "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "no-data"),
            "--no-download", "--quiet"]


@pytest.mark.parametrize("line", TOML_MISTAKES)
def test_a_wrong_toml_value_is_refused_naming_its_key(line, tmp_path, train_argv, capsys):
    settings = tmp_path / "settings.toml"
    settings.write_text(line + "\n")
    assert cli.main(train_argv + ["--config", str(settings)]) == 2
    err = capsys.readouterr().err
    assert TOML_MISTAKES[line] in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


FLAG_MISTAKES = {
    "--betas-encoder 0.5": "--betas-encoder takes exactly 2 values",
    "--betas-discriminator 0.5 0.9 0.99": "--betas-discriminator takes exactly 2 values",
    "--gamma inf": "--gamma must be a finite number",
    "--lr-decoder nan": "--lr-decoder must be a finite number",
    "--lr-encoder nan": "--lr-encoder must be a finite number",
    "--seed -3": "--seed must be non-negative",
    "--test-limit 1": "--test-limit must be 0 (all) or at least 2",
}


@pytest.mark.parametrize("flags", FLAG_MISTAKES)
def test_a_wrong_flag_value_is_refused_naming_its_setting(flags, train_argv, capsys):
    assert cli.main(train_argv + flags.split()) == 2
    err = capsys.readouterr().err
    assert FLAG_MISTAKES[flags] in err and "Traceback" not in err, err


def test_the_python_api_checks_types_too_and_converts_exact_ones():
    with pytest.raises(ConfigError, match="`epochs` must be a whole number, got 1.5"):
        Config(epochs=1.5)
    with pytest.raises(ConfigError, match="`epochs` must be a whole number, got True"):
        Config(epochs=True)
    config = Config(gamma=2, encoder_widths=[64, 32], betas_encoder=[0, 0.9])
    assert config.gamma == 2.0 and isinstance(config.gamma, float)
    assert config.encoder_widths == (64, 32) and config.betas_encoder == (0.0, 0.9)
    assert Config.from_dict(Config(extras={"note": [1, "a"]}).to_dict()).extras == {
        "note": [1, "a"]}


@pytest.mark.parametrize("command", [["sample"], ["evaluate"]])
def test_a_negative_seed_names_the_flag(command, tmp_path, capsys):
    argv = command + ["--checkpoint", str(tmp_path / "none.npz"), "--seed", "-1"]
    assert cli.main(argv) == 2
    assert "--seed must be non-negative" in capsys.readouterr().err
