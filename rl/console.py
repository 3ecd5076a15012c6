"""A quiet console for a run: the terminal shows the progress bar and the run's own log lines; everything else
(third-party warnings and prints, DeepSpeed / vLLM / Ray messages, every actor's streamed output, prefixed by
Ray with the actor and its pid) goes to ``<output_dir>/run.log``.

    with run_console(Path(cfg.output_dir) / "run.log"):
        ...                       # logging.getLogger("rl.x").info(...) -> terminal and run.log
    # stdout / stderr are the terminal again

Implemented at the file-descriptor level, so output of C++ code and of child processes is caught too.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, TextIO

# Loggers of this project (the top-level packages): their records reach the terminal.
OWN_PACKAGES = frozenset({"core", "models", "data", "actors", "rewards", "learner", "rl", "tools", "lab",
                          "__main__"})
_console: Optional[TextIO] = None
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def stream() -> TextIO:
    """Where the progress bar and the run's messages go: the terminal inside ``run_console``, else stderr."""
    return _console if _console is not None else sys.stderr


def own_records(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in OWN_PACKAGES


@contextmanager
def run_console(log_path: Path, level: int = logging.INFO) -> Iterator[TextIO]:
    """For the block: this process's stdout and stderr (file descriptors and Python streams) append to
    ``log_path``, the root logger writes every record there, and the run's own records also reach the
    terminal, which is yielded (the progress bar writes to it). Everything is restored afterwards."""
    global _console
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = (os.dup(1), os.dup(2))
    saved_streams = (sys.stdout, sys.stderr)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level)
    to_log = logging.StreamHandler(sys.stderr)
    to_terminal = logging.StreamHandler(terminal)
    to_terminal.addFilter(own_records)
    for handler in (to_log, to_terminal):
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers[:] = [to_log, to_terminal]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> run.log only
    _console = terminal
    try:
        yield terminal
    finally:
        _console = None
        logging.captureWarnings(False)
        root.handlers[:] = saved_logging[0]
        root.setLevel(saved_logging[1])
        for stream_ in (sys.stdout, sys.stderr):
            stream_.flush()
            stream_.close()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        terminal.close()
