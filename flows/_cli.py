"""What the command lines share."""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import UsageError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError` (``Error: ...``, exit 2), not argparse's own."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)
