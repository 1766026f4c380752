"""Bridges to training tools: PyTorch Lightning, Hugging Face Trainer, plain loops.

Each bridge only attaches a :class:`qkprobe.Probe` at the start of training, tells it the global
step before every step, and closes it at the end. Lightning and transformers are imported
lazily, so qkprobe works without them.
"""
