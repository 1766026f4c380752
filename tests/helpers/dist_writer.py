"""Write one shard with the probe until killed; prints the committed row count after each commit.

    python dist_writer.py SHARD FIRST_ID
"""

import sys
import time

import torch

import qkprobe

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dist_common import make_inputs, make_model  # noqa: E402

path, first = sys.argv[1], int(sys.argv[2])
model = make_model()
x = make_inputs()
probe = qkprobe.attach(model, path, top_samples=4)
n = first
with torch.no_grad():
    while True:
        probe.set_ids([f"s{n}", f"s{n + 1}"])
        model(x[[n % len(x), (n + 1) % len(x)]])
        n += 2
        probe.writer.commit(wait=True)
        print(probe.writer.acknowledged, flush=True)
        time.sleep(0.05)
