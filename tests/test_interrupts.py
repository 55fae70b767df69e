"""Ctrl-C held back while the model libraries import (lmzip.interrupts)."""

import os
import signal
import time

import pytest

from lmzip import interrupts


def interrupt_me():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # Python runs the handler at its next check


def test_a_ctrl_c_in_the_block_is_raised_when_the_block_ends():
    # as from a terminal: a background job (as CI may run the tests) starts with SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reached = False
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                interrupt_me()
                reached = True  # not raised in the middle
        assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_without_a_ctrl_c_the_block_ends_as_usual():
    before = signal.getsignal(signal.SIGINT)
    with interrupts.deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_ctrl_c_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.deferred():
            interrupt_me()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
