"""Every error the runtime and the capsule store raise on purpose.

Messages follow one rule: say what was expected, what was found, and what to do. The node turns
these into `success=false` responses; anything else escaping a callback is a bug.
"""


class FlashRTError(Exception):
    """Base class: a request was refused and nothing changed."""


class ConfigError(FlashRTError, ValueError):
    """A configuration value is invalid (caught at construction, before anything is allocated)."""


class NotConfiguredError(FlashRTError):
    """The runtime has no model/arena yet (configure first)."""


class InputError(FlashRTError, ValueError):
    """An observation, token sequence or request argument is malformed."""


class CapsuleNotFound(FlashRTError, KeyError):
    """No capsule of that name in the store."""

    def __str__(self):  # KeyError would quote the message
        return self.args[0] if self.args else ""


class CapsuleExists(FlashRTError):
    """A capsule of that name is already stored (delete it first or pick another name)."""


class CapsuleMismatch(FlashRTError):
    """A capsule was taken from another model, layout, weights or format version."""


class CapsuleCorrupt(FlashRTError):
    """A capsule file is truncated, bit-flipped or lies about its sizes."""


class CapsuleConflict(FlashRTError):
    """A capsule file is not the one this store wrote or indexed: another store or process wrote
    it, or replaced it since (two stores on one capsule directory)."""


class StorageError(FlashRTError):
    """The capsule directory cannot be read or written: read-only, removed, replaced by a file,
    permission denied."""


class BudgetExceeded(FlashRTError):
    """A tier has no room (after evicting every unpinned capsule it could)."""


class RollbackUnavailable(FlashRTError):
    """The rollback ring does not hold that many committed steps."""
