"""One error-reporting convention for every entry point (run_telechat2.py, python -m convert,
python -m telechat2_ms.data, the cost model and demo-corpus tools):

    return report_errors(lambda: work(args), debug=args.debug)

An expected failure (a bad setting or file: ValueError and its ConfigError / CheckpointError / DataError
kinds, OSError, UnicodeError) prints one `error: ...` line, the message naming the file or setting, and
returns 2. Anything else is a bug: one `error: internal error ...` line asking for --debug, returning 1.
With --debug both re-raise, so the traceback shows.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

EXPECTED = (ValueError, OSError, UnicodeError)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text or type(err).__name__


def report_errors(body: Callable[[], Optional[int]], debug: bool = False) -> int:
    """Run `body`; its return value (None = 0) is the exit code (module docstring for failures)."""
    try:
        return body() or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the one place that turns a bug into a one-line report
        if debug:
            raise
        print(f"error: internal error ({type(err).__name__}: {one_line(err)}); rerun with --debug for the "
              "traceback and report it", file=sys.stderr)
        return 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the same convention: a bad command line is one `error:` line (with the closest known
    option for a misspelt one), exit code 2."""

    def error(self, message: str):
        unknown = message.split("unrecognized arguments:", 1)
        if len(unknown) == 2:
            import difflib

            options = [o for action in self._actions for o in action.option_strings]
            for word in unknown[1].split():
                close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1)
                if word.startswith("--") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())}; see --help\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
