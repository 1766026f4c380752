"""One rank of a DDP run with the probe attached; launched by torchrun from tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 ... dist_probe.py OUT

Every rank builds the same tiny timm ViT (seed 0) and the same inputs (seed 1), attaches the probe
before wrapping the model in DDP, and runs forward + backward on its own samples (rank 0: s0-s8,
rank 1: s9-s14; the same number of batches on each rank, as DDP requires, of different sizes).
"""

import sys

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import qkprobe

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dist_common import BATCHES, make_inputs, make_model  # noqa: E402

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = make_model()
x = make_inputs()
probe = qkprobe.attach(model, out, top_samples=4)   # attach before wrapping: hooks on the real model
ddp = DistributedDataParallel(model)
for step, batch in enumerate(BATCHES[rank]):
    probe.step(step)
    probe.set_ids([f"s{i}" for i in batch])
    ddp(x[batch]).square().mean().backward()
probe.close()            # barrier; rank 0 merges the shards into OUT; barrier
dist.destroy_process_group()
print(f"rank {rank} done", flush=True)
