"""Fine-tune a small timm ViT on the scikit-image photos with the probe logging, then plot the
layer curves at several steps.

    python examples/finetune_with_probe.py --steps 300 --out finetune.h5 --plot finetune.png

Labels are synthetic (the photo's index mod 4), images get random crops and flips, so the run is
real training on real pixels that needs nothing from the network. The probe records every 10th
step, refreshes the bases every 25 steps, and mirrors headline scalars to TensorBoard if
``--tensorboard DIR`` is given.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import timm
import torch
from PIL import Image
from torchvision import transforms

import qkprobe
from qkprobe.data import skimage_images
from qkprobe.plot import layer_curve


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="finetune.h5")
    ap.add_argument("--plot", default="finetune.png")
    ap.add_argument("--tensorboard", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    paths = skimage_images(os.path.join(tempfile.gettempdir(), "qkprobe-skimage"))
    images = [Image.open(p).convert("RGB") for p in paths]
    aug = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.3, 1.0)), transforms.RandomHorizontalFlip(),
                              transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    model = timm.create_model(args.model, pretrained=False, num_classes=4).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tb = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(args.tensorboard)
    with qkprobe.attach(model, args.out, every=10, refresh_every=25, tensorboard=tb) as probe:
        for step in range(args.steps):
            probe.step(step)
            idx = torch.randint(0, len(images), (args.batch,))
            x = torch.stack([aug(images[i]) for i in idx])
            loss = torch.nn.functional.cross_entropy(model(x), idx % 4)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}")
    points = [p for p in probe.series if p["step"] >= 0]
    chosen = points[:: max(1, len(points) // 4)] + [points[-1]]
    fig = layer_curve({f"step {p['step']}": p["layers"] for p in chosen}, title=f"{args.model} fine-tuning")
    fig.savefig(args.plot, bbox_inches="tight")
    drift = points[-1]["layers"]
    print(f"wrote {args.out} and {args.plot}; largest query-subspace angle per layer at the end (rad): "
          + " ".join(f"{float(l['drift_q'].max()):.3f}" for l in drift))


if __name__ == "__main__":
    main()
