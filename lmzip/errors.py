"""The one exception root of lmzip and its named failures.

Every failure a user can cause (a damaged or hostile archive, the wrong model,
bad input) raises a subclass of LmzError whose message is one line that a
person understands. Anything else escaping lmzip is a bug.
"""


class LmzError(Exception):
    """Root of every error lmzip raises on purpose."""


class NotLmzError(LmzError):
    """The data does not start with the .lmz magic number."""


class UnsupportedError(LmzError):
    """A valid archive uses a feature this decoder does not know (newer, not damaged)."""


class UnsupportedVersionError(UnsupportedError):
    """A valid header names a format version this decoder does not know."""


class UnsupportedKindError(UnsupportedError):
    """A segment kind or an incompatible flag this decoder does not know."""


class TruncatedError(LmzError):
    """The archive ends before a structure it announces."""


class TrailingDataError(LmzError):
    """Bytes follow the last payload."""


class HeaderError(LmzError):
    """The header is damaged: checksum mismatch, reserved bits or a bad field."""


class LimitError(HeaderError):
    """A size read from the archive is beyond a named decoder limit."""


class SegmentTableError(LmzError):
    """The segment table is damaged or inconsistent."""


class SegmentError(LmzError):
    """One segment's payload does not decode to its original bytes."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"damaged segment {index}: {problem}")
        self.index = index


class ContentChecksumError(LmzError):
    """The decoded content does not match the archive's SHA-256."""


class ModelError(LmzError):
    """A model cannot be loaded or used."""


class ModelUnavailableError(ModelError):
    """The model the archive names cannot be found on this machine."""


class ModelMismatchError(ModelError):
    """The loaded model, tokenizer or weights differ from the archive's."""


class InputError(LmzError):
    """An input is unusable (wrong type, unreadable, the output is the input)."""


class OptionError(InputError):
    """An option's value, or a combination of options, is unusable (a usage error: CLI exit 2)."""


class OutputExistsError(LmzError, FileExistsError):
    """The output file exists and overwriting was not asked for."""


class WorkLimitError(LmzError):
    """Decoding the archive would take more work than the limit allows."""


class JournalError(InputError):
    """A resume journal belongs to another input or other options, or is unusable."""


class DeviceMemoryError(LmzError):
    """The GPU (or other device) ran out of memory, even at the smallest batch the work allows."""


def fitting_out_of_memory(device: str, batch_size: int) -> DeviceMemoryError:
    """What to tell a user whose fit ran out of device memory (in this process, a worker or an actor)."""
    if batch_size > 1:
        return DeviceMemoryError(f"out of {device} memory fitting {batch_size} segments at a time: give a smaller "
                                 "--batch-size (which cuts other regions: remove this run's journal first)")
    return DeviceMemoryError(f"out of {device} memory fitting one segment at a time: give a smaller --max-tokens "
                             "or fewer --vectors, or fit on the CPU")


class ClusterError(LmzError):
    """The Ray cluster cannot be used (Ray missing, unreachable) or kept losing the fitting work."""


class InternalError(LmzError):
    """An invariant of lmzip itself failed (a bug): nothing is written, and the message says so."""
