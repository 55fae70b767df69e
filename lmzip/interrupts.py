"""Ctrl-C held back while the model libraries import and load.

CPython (seen on 3.11) exits by SIGINT at the end, whatever handled the interrupt, when a
KeyboardInterrupt starts inside code that an extension module runs through PyRun_String, as
torch's and transformers' imports do: `lmzip` would then end with status -2 instead of 130,
after it had cleaned up and said "interrupted". A Ctrl-C during such a block is therefore
recorded, and raised as KeyboardInterrupt when the block ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred():
    """Run the block with SIGINT recorded instead of raised; then act on it as before."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # only the main thread may set handlers, and one set outside Python cannot be put back
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):  # default_int_handler raises KeyboardInterrupt
            previous(signal.SIGINT, None)
