"""One rank of an FSDP (FullyShardedDataParallel, CPU, gloo) fine-tuning run with the probe, as
docs/format.md ("Distributed") describes: attach before wrapping, refresh the bases inside
``FSDP.summon_full_params`` on every rank. Launched by torchrun from tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 ... dist_fsdp.py OUT

Prints "rank K refresh ok" when the refreshed bases equal ``compute_bases`` of an unsharded copy
of the weights of that step, and differ from the bases at attach.
"""

import sys
import warnings

import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import qkprobe

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dist_common import make_inputs, make_model  # noqa: E402

warnings.filterwarnings("ignore")
out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
model, x = make_model().train(), make_inputs()
probe = qkprobe.attach(model, out, top_samples=4)          # bases from the full weights
start = [lb.S.clone() for lb in probe.bases()]
fsdp = FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}))
opt = torch.optim.SGD(fsdp.parameters(), lr=0.5)
for step in range(2):
    probe.step(step)
    batch = [rank * 4 + step * 2, rank * 4 + step * 2 + 1]
    probe.set_ids([f"s{i}" for i in batch])
    fsdp(x[batch]).square().mean().backward()
    opt.step()
    opt.zero_grad()
    with FSDP.summon_full_params(fsdp, writeback=False):   # collective: on every rank
        probe.refresh(step)
        full = {name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for name, p in model.named_parameters()}
copy = make_model()
copy.load_state_dict(full)
expected = qkprobe.compute_bases(copy)
for lb, ref, s0 in zip(probe.bases(), expected, start):
    assert torch.allclose(lb.S, ref.S) and torch.allclose(lb.U, ref.U), "refreshed bases differ"
    assert not torch.allclose(lb.S, s0), "the bases did not change"
probe.close()
dist.destroy_process_group()
print(f"rank {rank} refresh ok", flush=True)
