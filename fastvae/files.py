"""Atomic file replacement: a crash mid-write never leaves a half-written file behind."""
import os
import re
import secrets
from pathlib import Path

from fastvae.errors import OutputError

_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # the names below: .NAME.PID.HEX.tmp


def temporary_writer(name):
    """The PID of the process that was writing temporary file `name` here, or None when
    `name` is not one of write_atomic's temporaries."""
    match = _TEMPORARY.match(name)
    return int(match[1]) if match else None


def _make_parent(path):
    """Create the folder `path` goes into; OutputError naming a file that stands in the way."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        blocker = next((folder for folder in path.parents if folder.is_file()), path.parent)
        raise OutputError(f"cannot write {path}: {blocker} is a file, not a folder; choose "
                          f"another path") from error
    except OSError as error:
        raise OutputError(f"cannot create the folder {path.parent} for {path}: "
                          f"{error.strerror or error}") from error


def write_atomic(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`."""
    if not Path(path).name:
        raise OutputError(f"no file name in the output path {str(path)!r}: name a file, such "
                          f"as samples.png")
    path = Path(path)
    _make_parent(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"could not write {path}: {error.strerror or error}; the previous "
                          f"version, if any, is unchanged") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
