"""What reaches the console: orpolab's one line per stage, errors as sentences; the rest goes to log files.

The libraries under a sweep (transformers, Lightning, MLflow, bitsandbytes, llama.cpp) each print
notices meant for their own developers. Repeated for every job they bury the lines a user acts
on, so their logs go to the job's or stage's log file, and the console keeps orpolab's messages,
errors, and warnings a user can do something about. ``ORPOLAB_VERBOSE=1`` shows everything again;
``ORPOLAB_DEBUG=1`` (or ``--debug`` on the stage commands) shows tracebacks instead of sentences.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from orpolab.core.errors import OrpolabError

DEBUG_ENV, VERBOSE_ENV = "ORPOLAB_DEBUG", "ORPOLAB_VERBOSE"
# ``log.info(..., extra=SHOW)``: a line meant for the console (a stage's result); ``extra=HIDE``: the file only.
SHOW, HIDE = {"console": True}, {"console": False}
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

# Warnings nobody running a sweep can act on (deprecations inside the libraries, printed once per job):
# (message regex, category). Specific on purpose, so that a new warning, possibly an actionable one,
# still shows. Library *log* notices (Lightning's "GPU available", its litlogger tip, bitsandbytes'
# missing `kernels`) are not warnings: they go to the log files (see ConsoleFilter).
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),  # Lightning on torch 2.13
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),  # peft on transformers 5
    # A resumed job writes its checkpoints where it wrote them before; and its sampler does resume
    # mid-epoch (its position is in the checkpoint), which Lightning cannot see.
    (r"Checkpoint directory .* exists and is not empty", UserWarning),
    (r"You're resuming from a checkpoint that ended before the epoch ended", UserWarning),
)
LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def flag(name: str) -> bool:
    """An on/off environment switch (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def debug() -> bool:
    """Tracebacks instead of one-line errors."""
    return flag(DEBUG_ENV)


def verbose() -> bool:
    """Every library's log on the console, as without orpolab's filtering."""
    return flag(VERBOSE_ENV)


def quiet_warnings() -> None:
    """Silence the known warnings a user cannot act on (see ``QUIET_WARNINGS``); the rest still show."""
    if verbose():
        return
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def adopt_library_loggers() -> None:
    """Loggers that libraries gave their own console handler now propagate to the root's handlers instead.

    Lightning adds stderr handlers to ``lightning`` (always) and to ``lightning.pytorch`` and
    ``lightning.fabric`` (when imported before logging is configured). Without this, its notices
    ("GPU available: False", "💡 Tip: ...") bypass the log files and land on the console.
    """
    for name in LIBRARY_LOGGERS:
        if name in logging.Logger.manager.loggerDict:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True


def quiet_libraries() -> None:
    """Route the libraries' own console output into Python logging, so the log files get it.

    Call it first thing: MLflow reads ``MLFLOW_CONFIGURE_LOGGING`` when it is imported (otherwise
    it installs its own console handler). transformers also draws a "Loading weights" bar for
    every model it loads. Lightning's handlers are removed later, once it is imported
    (:func:`adopt_library_loggers`, or ``loggers:`` in Hydra's ``job_logging``).
    """
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    quiet_warnings()
    if verbose():
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


class ConsoleFilter(logging.Filter):
    """What of the log reaches the console: lines marked ``SHOW``, Hydra's launcher lines, orpolab's
    warnings and anyone's errors; everything with ``ORPOLAB_VERBOSE=1``. The log files get all of it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        marked = getattr(record, "console", None)
        if marked is not None:
            return bool(marked)
        top = record.name.split(".", 1)[0]
        if top == "hydra":
            return record.levelno >= logging.INFO
        if top in ("orpolab", "__main__"):
            return record.levelno >= logging.WARNING
        return record.levelno >= logging.ERROR


class ConsoleFormatter(logging.Formatter):
    """orpolab's lines as they are; other loggers' with their level and name, so a stray error says whose it is."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and verbose():
            message += "\n" + self.formatException(record.exc_info)
        if record.name.split(".", 1)[0] in ("orpolab", "__main__", "hydra") and record.levelno < logging.WARNING:
            return message
        return f"{record.levelname.lower()} ({record.name}): {message}"


class LogFile(logging.FileHandler):
    """A file handler that creates its folder (a sweep's ``logs/`` may not exist yet)."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = "utf-8", delay: bool = True):
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, mode=mode, encoding=encoding, delay=delay)


def log_to(log_file: Path | None, stream=None) -> None:
    """Root logging for a stage process: everything at INFO to ``log_file``, the console filtered.

    The stage commands (``python -m orpolab.export`` / ``orpolab.evaluate``) call this; training
    jobs get the same from Hydra's ``job_logging`` (``conf/hydra/default.yaml``).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(ConsoleFormatter())
    console.addFilter(ConsoleFilter())
    root.addHandler(console)
    if log_file is not None:
        file_handler = LogFile(str(log_file))
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(file_handler)
    logging.captureWarnings(True)  # warnings that are not silenced go to the log file too
    adopt_library_loggers()
    quiet_warnings()


@contextmanager
def native_stderr_to(log_file: Path | None) -> Iterator[None]:
    """Send what C libraries write to file descriptor 2 into ``log_file`` for the duration.

    Most of llama.cpp's log goes through its log callback, but C code may also print to stderr
    directly, below Python's ``sys.stderr``; only moving the descriptor itself catches that.
    Restored afterwards, also on errors. With ``ORPOLAB_VERBOSE=1`` or no file, nothing is redirected.
    """
    if log_file is None or verbose():
        yield
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log_file, "ab") as fh:
            os.dup2(fh.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show tracebacks instead of one-line errors (or set {DEBUG_ENV}=1)")


def error_line(err: BaseException) -> str:
    """``error: ...`` as the console shows it: the sentence, or the exception's type and message."""
    if isinstance(err, OrpolabError):
        return f"error: {err}"
    return (f"error: {type(err).__name__}: {err}\n"
            f"(this looks like a bug or an unexpected environment; run again with {DEBUG_ENV}=1 for the traceback)")


def run_cli(main: Callable[[], int | None], debug_switch: bool = False) -> int:
    """Run a command's body: user mistakes become ``error: ...`` and exit status 1, never a traceback.

    ``debug_switch`` (a ``--debug`` flag) or ``ORPOLAB_DEBUG=1`` lets exceptions through, traceback and all.
    """
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as err:
        if debug_switch or debug():
            raise
        print(error_line(err), file=sys.stderr, flush=True)
        return 1


def brief_overrides(overrides: str) -> str:
    """A job's overrides without the folders (``paths.*``, ``hydra.*``): what makes it that job."""
    return " ".join(o for o in str(overrides).split() if not o.startswith(("paths.", "hydra.")))


def exit_on_error(fn: Callable) -> Callable:
    """Decorator for code Hydra runs outside the task function (the sweep callback): an error ends the
    command with ``error: ...`` and exit status 1 rather than Hydra's traceback (``ORPOLAB_DEBUG=1``: as is).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if debug():
                raise
            logging.getLogger(fn.__module__).error("%s", err, exc_info=True, extra=HIDE)
            print(error_line(err), file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
