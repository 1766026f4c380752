"""The probe under kill -9 with time-based snapshots: the model, the inputs and the recording loop
shared by tests/test_probe_kill.py and its fork server (run as a script).

    python probe_kill.py FOLDER REPS SEED

loads the model once, then REPS times forks a child that records every batch into FOLDER/kREP.h5
(snapshot every SNAPSHOT_S seconds) and reports each committed row count through a pipe, kills it
with SIGKILL at a random moment and prints ``killed REP ACKED``. Forking spares each run the
seconds of a fresh interpreter importing torch, so many kills stay cheap.
"""

import os
import random
import signal
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

BATCHES, BATCH = 30, 2
SNAPSHOT_S = 0.15  # several batches between snapshots, so kills land between them
TOP = 4


def make_model():
    import timm
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from peaked import peak_timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                              num_heads=2).eval()
    peak_timm(model, seed=0)
    return model


def make_batches():
    g = torch.Generator().manual_seed(5)
    return [([f"img{b * BATCH + j}" for j in range(BATCH)], torch.randn(BATCH, 3, 32, 32, generator=g))
            for b in range(BATCHES)]


def record(model, batches, path, resume=False, report=None, pause=0.0):
    """Record the batches not yet in ``path``; ``report(n)`` after each commit."""
    import qkprobe
    probe = qkprobe.attach(model, str(path), top_samples=TOP, snapshot_every_s=SNAPSHOT_S, resume=resume)
    done = set(probe.writer.existing_ids())
    with torch.no_grad():
        for ids, x in batches:
            if ids[0] in done:
                assert all(i in done for i in ids), "a batch was committed in part"
                continue
            probe.set_ids(ids)
            model(x)
            if report is not None:
                probe.writer.commit(wait=True)
                report(probe.writer.acknowledged)
            time.sleep(pause)
    probe.close()


def serve(folder, reps, seed):
    torch.set_num_threads(1)
    model, batches = make_model(), make_batches()
    record(model, batches[:2], os.path.join(folder, "warm.h5"))  # imports, compiled kernels: before the forks
    rng = random.Random(seed)
    for rep in range(reps):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the recording child
            os.close(r)
            try:
                record(model, batches, os.path.join(folder, f"k{rep}.h5"),
                       report=lambda n, w=w: os.write(w, f"{n}\n".encode()), pause=0.005)
            finally:
                os._exit(0)
        os.close(w)
        time.sleep(rng.uniform(0.0, 0.7))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r) as pipe:
            acks = [int(line) for line in pipe.read().split()]
        print(f"killed {rep} {max(acks, default=0)}", flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
