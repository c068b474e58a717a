"""A wall-clock limit on one call of user code (an unlearning method), without a subprocess.

In the main thread (the plain loop of `ufarm run --local`, and a Ray actor's task, which Ray runs on the
worker's main thread) a SIGALRM timer interrupts the call, also inside a blocking sleep or read. In any
other thread (a Ray Tune trial) a watchdog raises in the calling thread at its next Python bytecode. The
interrupt is a BaseException, so `except Exception` in user code does not swallow it, and it repeats every
second until the call gives up. A call that still runs `grace_seconds(limit)` after its limit (stuck in
native code, or swallowing every interrupt) cannot be stopped from inside the process: `on_stuck` is then
called from the watchdog thread; the engine records the failure and ends the process there.
"""
from __future__ import annotations

import ctypes
import signal
import threading
import time
from typing import Callable

REPEAT_SECONDS = 1.0


class TimeLimitExceeded(Exception):
    """The call ran past its limit (it was interrupted, or it returned after the limit)."""

    def __init__(self, limit: float, seconds: float):
        super().__init__(f"ran past its time limit of {limit:g} s ({seconds:.1f} s)")
        self.limit, self.seconds = limit, seconds


class _Interrupt(BaseException):
    """Raised inside the call when its time is up."""


def grace_seconds(limit: float) -> float:
    """How long an interrupted call has to give up before on_stuck: between 2 and 60 s."""
    return min(60.0, max(2.0, float(limit)))


def _can_use_alarm() -> bool:
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    # leave an alarm that someone else set (a handler or a running timer) alone: use the watchdog instead
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None) and \
        signal.getitimer(signal.ITIMER_REAL)[0] == 0


def call_with_time_limit(fn: Callable, limit: float, on_stuck: Callable[[], None] | None = None):
    """fn() if it returns within `limit` seconds; TimeLimitExceeded otherwise (see the module docstring)."""
    done = threading.Event()
    lock = threading.Lock()
    target = threading.get_ident()
    use_alarm = _can_use_alarm()
    grace = grace_seconds(limit)
    old_handler = None

    def inject() -> None:  # raise _Interrupt in the calling thread at its next bytecode
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(_Interrupt))

    def watchdog() -> None:
        if done.wait(limit):
            return
        end = time.monotonic() + grace
        while not use_alarm and time.monotonic() < end:
            with lock:
                if done.is_set():
                    return
                inject()
            if done.wait(REPEAT_SECONDS):
                return
        if not done.wait(max(0.0, end - time.monotonic())) and on_stuck is not None:
            on_stuck()

    def on_alarm(signum, frame) -> None:
        if not done.is_set():
            raise _Interrupt()

    def stop() -> None:
        # an interrupt may still arrive while stopping: repeat until the flag is set and nothing is pending
        while True:
            try:
                with lock:
                    done.set()
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    else:  # drop an interrupt injected but not raised yet
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
                if use_alarm:
                    signal.signal(signal.SIGALRM, old_handler)
                return
            except _Interrupt:
                continue

    if use_alarm:
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit, REPEAT_SECONDS)
    threading.Thread(target=watchdog, name="ufarm-time-limit", daemon=True).start()
    start = time.monotonic()
    interrupted = False
    try:
        try:
            result = fn()
        finally:
            stop()
    except _Interrupt:
        stop()
        interrupted = True
    seconds = time.monotonic() - start
    if interrupted or seconds > limit:
        raise TimeLimitExceeded(limit, seconds)
    return result
