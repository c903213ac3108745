"""What the plain-loop baselines share: the same data and freshly initialised model a job would get."""

from __future__ import annotations

import torch


def data_and_model(spec):
    """Seed, prepare the spec's dataset and build its model exactly as ``worker.ml.training`` does."""
    from worker.ml.architectures import ModelShape, build_model
    from worker.ml.datasets import load_table
    from worker.ml.preparation import prepare

    torch.manual_seed(spec.hyperparameters.seed)
    data = prepare(spec.dataset, load_table(spec.dataset, None, None), spec.model)
    signature = {**data.signature, "arch": spec.model.arch, "model": spec.model.model_dump(mode="json"), "format": 1}
    return data, build_model(spec.model, ModelShape.from_signature(signature))
