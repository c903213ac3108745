"""Every registered architecture builds, runs forward and backward, for every input kind it serves."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from app.jobs.schemas import ARCHITECTURES as SCHEMA_ARCHITECTURES
from app.jobs.schemas import ModelConfig
from app.task_rules import ARCHITECTURE_TASKS
from worker.ml.architectures import ARCHITECTURES, ModelShape, build_model

CONFIGS = {
    "mlp": {"arch": "mlp", "hidden_sizes": [16, 8], "dropout": 0.1, "activation": "gelu"},
    "rnn": {"arch": "rnn", "hidden_size": 8, "num_layers": 2, "dropout": 0.1},
    "lstm": {"arch": "lstm", "hidden_size": 8, "bidirectional": True},
    "gru": {"arch": "gru", "hidden_size": 8, "num_layers": 2, "bidirectional": True},
    "transformer": {"arch": "transformer", "d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16},
    "cnn1d": {"arch": "cnn1d", "channels": [4, 8, 8], "kernel_size": 3, "dropout": 0.1},
    # Three pooled blocks take a 6-pixel image to 3, then 1: the last block must not pool further.
    "cnn2d": {"arch": "cnn2d", "channels": [4, 8, 8], "kernel_size": 3, "dropout": 0.1},
    "causal_lm": {"arch": "causal_lm", "d_model": 8, "nhead": 2, "num_layers": 2, "dim_feedforward": 16, "block_size": 6},
    "seq2seq": {"arch": "seq2seq", "d_model": 8, "nhead": 2, "dim_feedforward": 16, "max_source_tokens": 4,
                "max_target_tokens": 4},
}
# Text generators give logits per token: (batch, tokens, vocabulary).
GENERATIVE = ("language_modeling", "sequence_to_sequence")
IMAGE_SHAPE = (3, 6, 6)
# (task, input kind, sequence shape, outputs, a batch of inputs, targets)
TASK_INPUTS = {
    "classification": ("vector", (8, 8), 10, lambda: torch.randn(5, 64), lambda: torch.randint(0, 10, (5,))),
    "regression": ("vector", (10, 1), 1, lambda: torch.randn(5, 10), lambda: torch.randn(5, 1)),
    "forecasting": ("sequence", (12, 1), 3, lambda: torch.randn(5, 12, 1), lambda: torch.randn(5, 3)),
    "text_classification": (
        "tokens", (6, 1), 2,
        # Right-padded token ids (0 pads), including a row with a single real token.
        lambda: torch.tensor([[5, 6, 7, 0, 0, 0], [2, 0, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8], [9, 9, 0, 0, 0, 0],
                              [1, 2, 3, 0, 0, 0]]),
        lambda: torch.tensor([0, 1, 1, 0, 1]),
    ),
    "image_classification": ("image", (18, 6), 4, lambda: torch.randn(5, *IMAGE_SHAPE), lambda: torch.randint(0, 4, (5,))),
    "language_modeling": ("tokens", (6, 1), 10, lambda: torch.randint(0, 10, (5, 6)), lambda: torch.randint(0, 10, (5, 6))),
    # Source ids (end id 2, then padding), then decoder inputs (start id 1, then the target shifted right).
    "sequence_to_sequence": ("tokens", (8, 1), 10,
                             lambda: torch.tensor([[5, 6, 2, 0, 1, 6, 5, 0]] * 4 + [[7, 8, 9, 2, 1, 9, 8, 7]]),
                             lambda: torch.tensor([[6, 5, 2, 0]] * 4 + [[9, 8, 7, 2]])),
}
_config = TypeAdapter(ModelConfig)


def test_registry_matches_the_schema_architectures():
    # "pretrained" is built by worker.ml.pretrained from the catalog, not from the registry.
    assert tuple(ARCHITECTURES) + ("pretrained",) == SCHEMA_ARCHITECTURES


def test_every_architecture_and_task_pair_has_a_rule_and_a_test_input():
    # The registry's architectures are tested here; "pretrained" in test_ml_pretrained.py.
    assert set(ARCHITECTURE_TASKS) == set(SCHEMA_ARCHITECTURES)
    assert {t for ts in ARCHITECTURE_TASKS.values() for t in ts} == set(TASK_INPUTS)


@pytest.mark.parametrize("arch,task", [(a, t) for a in ARCHITECTURES for t in sorted(ARCHITECTURE_TASKS[a])])
def test_forward_and_backward_for_every_task(arch, task):
    kind, sequence_shape, outputs, make_x, make_y = TASK_INPUTS[task]
    assert task in ARCHITECTURES[arch].tasks
    torch.manual_seed(0)
    image_shape = IMAGE_SHAPE if kind == "image" else None
    shape = ModelShape(kind, sequence_shape, outputs, vocab_size=10, image_shape=image_shape)
    model = build_model(_config.validate_python(CONFIGS[arch]), shape)
    x, y = make_x(), make_y()
    out = model(x)
    if task in GENERATIVE:
        assert out.shape == (*y.shape, outputs)
        out = out.transpose(1, 2)
    else:
        assert out.shape == (5, outputs)
    loss = torch.nn.functional.cross_entropy(out, y) if y.dtype == torch.long else torch.nn.functional.mse_loss(out, y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "none"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_transformer_positions_and_pooling(positional, pooling):
    config = _config.validate_python({**CONFIGS["transformer"], "positional": positional, "pooling": pooling})
    model = build_model(config, ModelShape("tokens", (6, 1), 3, vocab_size=10)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 7, 8, 0, 0]])
    out = model(ids)
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_padding_does_not_change_a_text_prediction():
    # Extra padding after a text must not change what sequence models compute from it.
    for arch in ("lstm", "gru", "transformer", "cnn1d", "mlp"):
        config = _config.validate_python({**CONFIGS[arch], **({"dropout": 0.0} if "dropout" in CONFIGS[arch] else {})})
        torch.manual_seed(0)
        short = build_model(config, ModelShape("tokens", (4, 1), 2, vocab_size=10)).eval()
        torch.manual_seed(0)
        long = build_model(config, ModelShape("tokens", (8, 1), 2, vocab_size=10)).eval()
        if arch == "transformer":
            long.load_state_dict(short.state_dict())
        with torch.no_grad():
            a = short(torch.tensor([[3, 4, 5, 0]]))
            b = long(torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0]]))
        assert torch.allclose(a, b, atol=1e-5), arch


@pytest.mark.parametrize("arch,task", [(a, t) for a in ARCHITECTURES for t in sorted(ARCHITECTURE_TASKS[a])
                                       if t in ("classification", "text_classification", "image_classification")])
def test_every_architecture_runs_under_bf16_autocast(arch, task):
    # CUDA trains under bf16 autocast; CPU autocast exercises the same casts (RNNs opt out to fp32).
    kind, sequence_shape, outputs, make_x, make_y = TASK_INPUTS[task]
    shape = ModelShape(kind, sequence_shape, outputs, vocab_size=10, image_shape=IMAGE_SHAPE if kind == "image" else None)
    model = build_model(_config.validate_python(CONFIGS[arch]), shape)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(make_x())
    loss = torch.nn.functional.cross_entropy(out.float(), make_y())
    loss.backward()
    assert torch.isfinite(loss)


def test_configure_threads_sets_torch_intra_op_threads():
    from worker.ml import configure_threads

    before = torch.get_num_threads()
    try:
        configure_threads(1)
        assert torch.get_num_threads() == 1
        configure_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
