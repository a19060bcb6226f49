"""The run directory: one training at a time holds it, and it is usable before the first epoch.

`claim(run_dir)` takes a lock file holding the trainer's PID (an flock, which the kernel drops
when the process dies, so a lock left by a killed run never blocks) and checks that the folder
can be written and has room for a checkpoint; `remove_stale_temporaries` then removes only
this program's half-written files whose writers are dead.
"""
import contextlib
import os
import shutil
from pathlib import Path

from fastvae.errors import TrainingError
from fastvae.files import temporary_writer

LOCK = ".fastvae.lock"
SPARE_BYTES = 16 << 20  # room for the pictures and metrics beside the checkpoints

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rest still applies
    fcntl = None


def process_alive(pid):
    """Whether process `pid` runs on this machine (it may be another user's; a zombie, killed
    but not reaped, does not run)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _holder(path):
    """The PID written in a lock file, or None when it holds none."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lock(run_dir):
    """An open descriptor holding the run directory's lock (None where the file system has no
    locks); TrainingError if a live run holds it."""
    path = run_dir / LOCK
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _unwritable(run_dir, error) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            pid = _holder(path)
            who = f"process {pid}" if pid else "another process"
            raise TrainingError(f"{run_dir} is in use by another training ({who}, lock file "
                                f"{path}): wait for it to finish or stop it, or train into "
                                f"another `run_dir`") from None
        except OSError:  # a file system without locks (some network mounts): train unlocked
            os.close(descriptor)
            return None
        try:
            same_file = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # not a lock file that its holder removed while we opened it
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)


def _release(run_dir, descriptor):
    """Remove the lock file (while still holding it, so no one else holds that file) and drop it."""
    with contextlib.suppress(OSError):
        os.unlink(run_dir / LOCK)
    os.close(descriptor)


def _unwritable(run_dir, error):
    return TrainingError(f"cannot write into the run directory {run_dir} "
                         f"({error.strerror or error}): fix its permissions or choose "
                         f"another `run_dir`")


def remove_stale_temporaries(run_dir):
    """Delete the half-written files (`.NAME.PID.XXXXXXXX.tmp`) of processes no longer running."""
    for path in run_dir.iterdir():
        writer = temporary_writer(path.name)
        if writer is not None and path.is_file() and not process_alive(writer):
            with contextlib.suppress(OSError):   # not ours to remove after all: leave it
                path.unlink()


def check_usable(run_dir, needed_bytes):
    """TrainingError unless `run_dir` takes a new file and has `needed_bytes` (plus spare) free."""
    probe = run_dir / f".fastvae-probe.{os.getpid()}.tmp"
    try:
        with open(probe, "xb") as file:
            file.write(b"probe")
    except OSError as error:
        raise _unwritable(run_dir, error) from error
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes + SPARE_BYTES:
        raise TrainingError(f"{run_dir} has {free / 1e6:.0f} MB free, but a checkpoint of this "
                            f"model needs about {needed_bytes / 1e6:.0f} MB (twice while it is "
                            f"replaced) and the pictures {SPARE_BYTES / 1e6:.0f} MB: free some "
                            f"space or choose another `run_dir`")


def make(run_dir):
    """Create the run directory, as TrainingError when a path component is in the way."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainingError(f"cannot create the run directory {run_dir} "
                            f"({error.strerror or error}): choose another `run_dir`") from error
    return run_dir


@contextlib.contextmanager
def claim(run_dir, needed_bytes=0):
    """Hold `run_dir` for one training: created, locked, writable, with room."""
    run_dir = make(run_dir)
    descriptor = _lock(run_dir) if fcntl is not None else None
    try:
        check_usable(run_dir, needed_bytes)
        yield run_dir
    finally:
        if descriptor is not None:
            _release(run_dir, descriptor)
