"""Checkpoints: one .npz file with every array plus a JSON header, written atomically.

The header holds the format version, the config, optimizer counters, the noise generator's
state, caller extras (epoch, data-order state, history) and a SHA-256 of the arrays, so a
truncated, corrupted or foreign file is refused with a clear message instead of half-loaded.
"""
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from fastvae.errors import CheckpointError
from fastvae.files import write_atomic

FORMAT = "fastvae-checkpoint"
VERSION = 1


def _digest(arrays):
    sha = hashlib.sha256()
    for key in sorted(arrays):
        sha.update(key.encode())
        sha.update(np.ascontiguousarray(arrays[key]).tobytes())
    return sha.hexdigest()


def model_arrays(model):
    """Every array of the model's state, as NumPy, keyed by name."""
    arrays = {f"params/{name}": model.backend.to_numpy(p) for name, p in model.params.items()}
    for name, optimizer in model.optimizers.items():
        for key, value in optimizer.state().items():
            if key != "step_count":
                arrays[f"optimizer/{name}/{key}"] = model.backend.to_numpy(value)
    return arrays


def save(path, model, extra=None):
    """Write `model` (config, parameters, optimizer state, noise RNG state) and `extra`."""
    arrays = model_arrays(model)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "step_counts": {name: opt.step_count for name, opt in model.optimizers.items()},
        "noise_rng": model.backend.rng.bit_generator.state,
        "extra": extra or {},
        "sha256": _digest(arrays),
    }
    write_archive(path, header, arrays)


def write_archive(path, header, arrays):
    """One .npz holding `arrays` and the JSON `header`, replacing `path` atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    write_atomic(path, lambda file: file.write(buffer.getbuffer()))


def read_archive(path, kind="checkpoint"):
    """(header, arrays) of a file written by `write_archive`; CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} {path} does not exist (or is not a file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "header" not in archive.files:
                raise CheckpointError(f"{path} is not a fastvae {kind} (no header)")
            header = json.loads(archive["header"].tobytes().decode())
            arrays = {key: archive[key] for key in archive.files if key != "header"}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, UnicodeDecodeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable {kind} (truncated or not a "
                              f"fastvae file: {error})") from error
    return header, arrays


def read(path):
    """(header, arrays) of a checkpoint file, verified; CheckpointError if it is not a good one."""
    header, arrays = read_archive(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastvae checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {header.get('version')}; "
                              f"this fastvae reads version {VERSION}")
    if _digest(arrays) != header.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: its arrays do not match their checksum")
    return header, arrays


def restore(model, header, arrays, path="checkpoint"):
    """Copy a checkpoint's state into a model built with the same architecture."""
    expected = model_arrays(model)
    for key, value in expected.items():
        if key not in arrays or arrays[key].shape != value.shape:
            found = arrays[key].shape if key in arrays else "nothing"
            raise CheckpointError(f"{path} does not fit this model: {key} should have shape "
                                  f"{value.shape}, found {found}")
    for name, params in model.params.items():
        params[...] = model.backend.asarray(arrays[f"params/{name}"])
    for name, optimizer in model.optimizers.items():
        state = {key.rsplit("/", 1)[1]: value for key, value in arrays.items()
                 if key.startswith(f"optimizer/{name}/")}
        state["step_count"] = header["step_counts"][name]
        optimizer.load_state(state)
    model.refresh_bf16_weights()
    model.backend.rng.bit_generator.state = header["noise_rng"]


def load(path, backend=None, precision=None):
    """(model, extra): the model rebuilt from the checkpoint's config, on `backend` and at
    `precision` if given."""
    from fastvae.backend import Backend
    from fastvae.config import Config
    from fastvae.model import VAEGAN

    header, arrays = read(path)
    try:
        config = Config.from_dict(header["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an invalid config: {error}") from error
    if precision:
        config = config.replace(precision=precision)
    if isinstance(backend, str):
        backend = Backend(backend, config.dtype, precision=config.precision)
    model = VAEGAN(config, backend)
    restore(model, header, arrays, path)
    return model, header["extra"]
