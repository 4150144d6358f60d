"""Bad input on the command line as one line `fxzip: error: …` on stderr and a non-zero exit
status instead of a traceback; warnings as one line `fxzip: warning: …`."""
from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import FxzipError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def guarded(command: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a command; FxzipErrors and file errors become one line and exit status 1."""
    try:
        with _one_line_warnings():
            command(args)
    except FxzipError as e:
        return fail(str(e))
    except ImportError as e:  # an optional library: timm, torchvision, matplotlib
        return fail(f"this needs the package {e.name or e}: pip install 'fxzip[merge]' "
                    "(image folders, report.png) or 'fxzip[timm]' (timm models)")
    except OSError as e:
        return fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
    except KeyboardInterrupt:
        fail("interrupted")
        return EXIT_INTERRUPTED
    return 0


def fail(message: str) -> int:
    """Print `fxzip: error: <message on one line>` to stderr; the exit status of an error."""
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    print(f"fxzip: error: {text}", file=sys.stderr, flush=True)
    return EXIT_ERROR


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings as `fxzip: warning: …` lines, without the source line Python adds."""
    def show(message: Any, category: type, *_: Any, **__: Any) -> None:
        print(f"fxzip: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
