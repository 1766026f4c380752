"""Lightning and Hugging Face Trainer callbacks log the expected steps; TensorBoard mirroring."""

import numpy as np
import timm
import torch

import qkprobe


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=3)


def test_lightning_callback_logs_each_training_step(tmp_path):
    import lightning.pytorch as pl

    from qkprobe.integrations.lightning import QKProbeCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_vit()

        def training_step(self, batch, idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, idx):
            x, y = batch
            self.net(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    cb = QKProbeCallback(str(tmp_path / "pl.h5"), module_attr="net", every=2, refresh_every=2)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(Module(), loader, loader)
    run = qkprobe.open_run(str(tmp_path / "pl.h5"))
    assert run.steps.tolist() == [0, 0, 2, 2]  # every 2nd training step; validation not recorded
    run.close()
    assert cb.probe.closed and [p["step"] for p in cb.probe.series] == [-1, 0, 2]


def test_hf_trainer_callback_logs_each_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    from qkprobe.integrations.hf_trainer import QKProbeTrainerCallback

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_vit()

        def forward(self, pixel_values, labels):
            return {"loss": torch.nn.functional.cross_entropy(self.net(pixel_values), labels)}

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 3}

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
                             dataloader_num_workers=0)
    cb = QKProbeTrainerCallback(str(tmp_path / "hf.h5"))
    Trainer(model=Wrapped(), args=args, train_dataset=DS(), callbacks=[cb]).train()
    run = qkprobe.open_run(str(tmp_path / "hf.h5"))
    assert run.steps.tolist() == [0, 0, 1, 1, 2, 2]
    run.close()


def test_tensorboard_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_vit()
    tb = SummaryWriter(str(tmp_path / "tb"))
    probe = qkprobe.attach(model, refresh_every=1, tensorboard=tb)
    for step in range(3):
        probe.step(step)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    probe.close()
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "qkprobe/weighted_cosine/L0" in tags and "qkprobe/drift_q/L1" in tags
    vals = [e.value for e in acc.Scalars("qkprobe/mean_cosine/L0")]
    expected = qkprobe.compute_bases(model)[0].layer_summary()["mean_cosine"]
    assert np.isclose(vals[-1], expected, atol=1e-6)
