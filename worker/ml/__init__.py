"""Kiln's PyTorch engine: architectures, datasets, the training loop, checkpoints and prediction.

This package is the only place in Kiln that imports torch. The runner calls
``worker.ml.training.train`` and ``worker.ml.prediction.predict``; everything else here serves them.
"""

from __future__ import annotations


def configure_threads(n: int | None) -> None:
    """Set torch's intra-op thread count for this process (None leaves torch's default)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    # Imported here so that importing worker.ml stays cheap for code that only needs the package.
    import torch

    torch.set_num_threads(n)
