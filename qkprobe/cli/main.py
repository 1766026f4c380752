"""``qkprobe`` command line: ``bases``, ``run``, ``inspect``, ``recover``.

Bad input ends with one sentence on stderr and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
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
        return int(args.func(args) or 0)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
