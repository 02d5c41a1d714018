"""User-facing errors: one line, a non-zero exit, no traceback."""
from __future__ import annotations

import functools
import sys

__all__ = ["UserError", "exit_on_user_error"]


class UserError(Exception):
    """Bad input from the user. The message names what is wrong and what is accepted."""


def exit_on_user_error(main):
    """Wrap a command's main so a UserError prints `error: ...` and exits with status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapped
