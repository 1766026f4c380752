"""``qkprobe`` command line: ``bases``, ``run``, ``inspect``, ``report``, ``ablate``, ``merge``, ``recover``.

Bad input ends with one sentence on stderr and a non-zero exit; ``--debug`` shows the traceback.
A reader that stops early (``qkprobe inspect RUN | head -1``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .._version import __version__
from ..errors import QKProbeError


def _subcommands():
    from . import bases_cmd
    mods = [bases_cmd]
    try:
        from . import run_cmd
        mods.append(run_cmd)
    except ImportError:  # pragma: no cover - run command not built yet
        pass
    from . import report_cmd; mods.append(report_cmd)  # noqa: E702
    from . import merge_cmd; mods.append(merge_cmd)  # noqa: E702
    from . import ablate_cmd; mods.append(ablate_cmd)  # noqa: E702
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkprobe",
                                     description="Dissect query-key interaction in vision transformers.")
    parser.add_argument("--version", action="version", version=f"qkprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in _subcommands():
        mod.add_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = int(args.func(args) or 0)
        sys.stdout.flush()   # a closed pipe shows here, inside the handler below, not at exit
        return result
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except (QKProbeError, OSError, ValueError) as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"qkprobe {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qkprobe {args.command}: interrupted; committed rows are kept.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - anything else is a bug: one line, the traceback on request
        if args.debug:
            raise
        text = " ".join(str(e).split())[:300]
        print(f"qkprobe {args.command}: internal error ({type(e).__name__}: {text}); rerun with --debug for the "
              f"traceback and report it.", file=sys.stderr)
        return 2


def _quiet_stdout() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null, so the interpreter's
    final flush raises nothing (Python's documented recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured in tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
