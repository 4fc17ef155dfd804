"""Command line: ``obslib evaluate``, ``obslib prune``, ``obslib train-default-model``.

Bad input is reported as one line on stderr with exit code 2; nothing is written in that case.
"""
from __future__ import annotations

import argparse
import re
import sys

from .io import UsageError


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a value such as -1e-5 or -inf is a (bad) number, not an unknown option: let the range check name it
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message):  # one line, exit 2 (argparse prints usage otherwise)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="obslib", description="OBS-Diff pruning study tools")
    p.add_argument("--version", action="version", version=f"obslib {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from . import evaluate as _evaluate

    _evaluate.add_cli(sub)
    try:
        from . import api as _api

        _api.add_cli(sub)
    except ImportError:  # pragma: no cover - during bootstrap only
        pass
    t = sub.add_parser("train-default-model", help="train the embedded shapes-sd3 model (resumable)")
    t.set_defaults(func=lambda a: __import__("obslib.shapes.train", fromlist=["main"]).main(a.rest))
    t.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv=None) -> int:
    from .obs import SolverError

    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # the command as typed: an interrupted run's closing line repeats it with --resume
        args.func(args)
    except (UsageError, SolverError) as e:
        print(f"obslib: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
