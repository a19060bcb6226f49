"""The one error family: every mistake a user can make or meet ends in one of these.

The CLI turns exactly this family into a one-line message with exit status 2; any other
exception is a bug and shows its traceback. Messages speak of settings by their Config (or
keyword-argument) names in backticks, such as `batch_size`; the CLI phrases those as flags
(--batch-size).
"""


class FastvaeError(Exception):
    """Base of every error that is the user's input or environment, not a bug."""


class ConfigError(FastvaeError, ValueError):
    """A setting that is out of range, of the wrong type, or unknown; `field` names it."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


class DataError(FastvaeError):
    """A dataset file is missing, corrupt or unobtainable; the message says which and what to do."""


class CheckpointError(FastvaeError, ValueError):
    """A checkpoint (or cache archive) that cannot be read or does not fit the model."""


class ImageError(FastvaeError, ValueError):
    """A user image that cannot be used, with a message naming the file and the fix."""


class OutputError(FastvaeError, OSError):
    """An output file that cannot be written (no name, a file where a folder must be, a full
    disk); whatever was there before is unchanged."""


class TrainingError(FastvaeError, RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable run directory)."""


class UnknownBackend(FastvaeError, KeyError):
    """A backend name that no module is registered for."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class BackendUnavailable(FastvaeError, RuntimeError):
    """A known backend whose library or hardware is missing on this machine."""
