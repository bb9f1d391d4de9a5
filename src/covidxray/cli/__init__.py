"""Command-line interface: ``covidxray {data,train,train-segmenter,train-gate,evaluate,predict,...} ...``.

Exit codes: 0 success, 1 a check found problems (leakage, unreadable files), 2 bad input
(an unreadable image, a malformed manifest, a missing model), with a one-line message naming
the file and the problem instead of a traceback; 3 (``predict``) every input was read but some
were not frontal chest X-rays and got no answer (``not_answered`` with a reason).

Building the parser imports nothing heavy (no torch): each command imports the stage it runs
when it runs, so ``covidxray --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .. import __version__
from ..errors import CovidXrayError
from ..utils import LOG_FORMAT
from . import component_commands, data_commands, dicom_commands, predict_commands, run_commands, site_commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="covidxray", description="Detect COVID-19 on chest X-rays (COVID-19 is the positive class).")
    p.add_argument("--version", action="version", version=f"covidxray {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Parent parsers: the arguments that evaluate, calibrate, audit, export and card share.
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("run", help="run folder (or model.json)")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", help="data to use (default: the run's training data)")
    data.add_argument("--splits", help="split CSV (default: the run's)")
    data.add_argument("--cache-dir", help="decoded-image cache (default $COVIDXRAY_CACHE or ~/.cache/covidxray)")
    data_commands.register(sub)
    run_commands.register(sub, run, data)
    component_commands.register(sub)
    predict_commands.register(sub)
    dicom_commands.register(sub)
    site_commands.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    try:
        code = args.func(args)
        from ..distributed import teardown  # torch: imported once a command has run, never for --help

        teardown()  # under torchrun: no rank exits before rank 0 has written the last files
        return code
    except CovidXrayError as e:
        print(f"covidxray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidxray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
