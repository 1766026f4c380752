"""``qkprobe run`` options of issue 10: --backend, --snapshot-every, --workers from the machine."""

import os
import subprocess
import sys

import pytest

from qkprobe.cli.run_cmd import _loader_options
from qkprobe.data import default_workers


def test_workers_default_from_the_machine_and_pinned_prefetch_on_cuda(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert default_workers() == 11
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == 16
    assert _loader_options(None, cuda=True) == {"workers": 16, "pin_memory": True, "prefetch": 4}
    assert _loader_options(3, cuda=False) == {"workers": 3, "pin_memory": False, "prefetch": None}
    assert _loader_options(0, cuda=True)["prefetch"] is None  # no workers: nothing to prefetch with


def test_forced_backend_that_cannot_run_exits_2_with_one_sentence(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "qkprobe.cli.main", "run", "timm:test_vit", "--random-init",
                        "--backend", "triton", "--out", str(tmp_path / "r.h5"), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stderr
    assert "backend 'triton' cannot run here" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_run_with_a_backend_and_snapshot_interval(tmp_path, backend):
    from qkprobe.cli.main import main
    import qkprobe
    out = tmp_path / f"{backend}.h5"
    assert main(["run", "timm:test_vit", "--random-init", "--out", str(out), "--batch-size", "4", "--workers", "0",
                 "--backend", backend, "--snapshot-every", "0", "--no-progress"]) == 0
    with qkprobe.open_run(str(out)) as run:
        assert len(run) > 0 and int(run.snapshot(0, "snapshot_rows")) == len(run)
        assert "backend" not in run.metadata["options"]  # how, not what: a resume may change it
