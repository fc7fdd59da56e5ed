"""The one way this tool makes progress bars.

On a terminal: a tqdm bar redrawn in place. Anywhere else (a log file, CI, nohup) carriage-return redraws would
pile up in the file, so the bar is printed as a plain line at most every ``LOG_INTERVAL_S`` seconds and once at
the end.
"""
from __future__ import annotations

import re
import sys
from typing import IO, Iterable, Optional

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _LineWriter:
    """A file for tqdm that turns each redraw into one line and drops the blank 'clear' writes."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, s: str) -> None:
        text = _ANSI.sub("", s).replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogTqdm(tqdm):
    """A tqdm whose postfix changes wait for the next timed line instead of printing one each."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)

    def close(self):
        # ``delay`` keeps the 0% line out of the log; the final state is always written, once
        if not self.disable and self.leave and self.last_print_n != self.n:
            self.refresh()
        self.leave = False
        super().close()


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 enabled: bool = True, file: Optional[IO[str]] = None, **kwargs) -> tqdm:
    """``tqdm(iterable, total=..., desc=...)``; nothing shown when ``enabled`` is false."""
    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    if _is_tty(stream):
        kwargs.setdefault("leave", False)
        return tqdm(iterable, total=total, desc=desc, file=stream, dynamic_ncols=True, **kwargs)
    kwargs["leave"] = True  # the final state is the line worth keeping in a log
    known = total is not None or hasattr(iterable, "__len__")
    fmt = ("{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]" if known
           else "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]")
    return _LogTqdm(iterable, total=total, desc=desc, file=_LineWriter(stream), mininterval=LOG_INTERVAL_S,
                    maxinterval=max(LOG_INTERVAL_S, 10.0), miniters=1, delay=LOG_INTERVAL_S, bar_format=fmt,
                    **kwargs)
