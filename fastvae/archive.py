"""Versioned, checksummed .npz archives: named arrays plus a JSON header, written atomically.

Checkpoints and the classifier cache are archives. The header carries a SHA-256 of the arrays
(`digest`), so a truncated, corrupted or foreign file is refused with a clear message instead
of half-loaded.
"""
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from fastvae.errors import CheckpointError
from fastvae.files import write_atomic

__all__ = ["CheckpointError", "digest", "read", "write"]


def digest(arrays):
    """SHA-256 (hex) of the arrays' names and bytes, in name order."""
    sha = hashlib.sha256()
    for key in sorted(arrays):
        sha.update(key.encode())
        sha.update(np.ascontiguousarray(arrays[key]).tobytes())
    return sha.hexdigest()


def write(path, header, arrays):
    """One .npz holding `arrays` and the JSON `header`, replacing `path` atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    write_atomic(path, lambda file: file.write(buffer.getbuffer()))


def read(path, kind="checkpoint"):
    """(header, arrays) of a file written by `write`; CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} {path} does not exist (or is not a file)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path} holds a single array (.npy), not a fastvae {kind}: "
                                  f"give the .npz that fastvae wrote")
        with loaded as archive:
            if "header" not in archive.files:
                raise CheckpointError(f"{path} is not a fastvae {kind} (no header)")
            header = json.loads(archive["header"].tobytes().decode())
            arrays = {key: archive[key] for key in archive.files if key != "header"}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, UnicodeDecodeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable {kind} (truncated or not a "
                              f"fastvae file: {error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a fastvae {kind} (its header is not a JSON "
                              f"object)")
    return header, arrays
