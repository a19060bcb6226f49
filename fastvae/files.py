"""Atomic file replacement: a crash mid-write never leaves a half-written file behind."""
import os
import secrets
from pathlib import Path

from fastvae.errors import OutputError


def write_atomic(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(error.errno, f"could not write {path}: {error.strerror or error}; the "
                                       f"previous version, if any, is unchanged") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
