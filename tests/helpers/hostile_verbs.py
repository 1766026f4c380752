"""Run one qkprobe verb on each of several files, in this one process; one JSON line per file.

    python hostile_verbs.py VERB WORKDIR IMAGES FILE...

VERB is inspect, report, resume, merge, recover or open_run. Each file gets a watchdog
(faulthandler): a verb that hangs kills this process, which the test reports as a hang of
that file. stderr of each verb is captured and returned.
"""

import contextlib
import faulthandler
import io
import json
import os
import sys
import time

LIMIT_S = 20


def argv(verb: str, path: str, work: str, images: str):
    out = os.path.join(work, f"out-{verb}-{os.path.basename(path)}")
    return {"inspect": ["inspect", path],
            "report": ["report", path, "--out", out, "--no-maps", "--no-progress"],
            "resume": ["run", "timm:test_vit", "--random-init", "--images", images, "--out", path, "--resume",
                       "--no-progress"],
            "merge": ["merge", path, "--out", out + ".h5"],
            "recover": ["recover", path]}[verb]


def main() -> None:
    verb, work, images, *files = sys.argv[1:]
    from qkprobe.cli.main import main as cli
    from qkprobe.errors import QKProbeError
    for path in files:
        print(json.dumps({"start": path}), flush=True)
        faulthandler.dump_traceback_later(LIMIT_S, exit=True)
        err, t0 = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if verb == "open_run":
                import qkprobe
                try:
                    qkprobe.open_run(path).close()
                    rc = 0
                except QKProbeError as exc:
                    print(str(exc), file=sys.stderr)
                    rc = 2
                except Exception as exc:  # noqa: BLE001 - reported to the test as a failure
                    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
                    rc = 1
            else:
                rc = cli(argv(verb, path, work, images))
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps({"file": path, "rc": rc, "stderr": err.getvalue(),
                          "seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
