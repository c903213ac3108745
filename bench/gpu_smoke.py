"""GPU smoke check: a transformer job on CUDA through Kiln's loop versus a plain loop on the same GPU.

    python -m bench.gpu_smoke [--epochs 5] [--batch-size 256]
    python -m bench.gpu_smoke --model causal-lm [--epochs 5] [--batch-size 64]

Needs a CUDA device (exits 2 without one). Trains the same transformer on digits with the same
seed through ``worker.ml.training.train`` (bf16 autocast, pinned memory, checkpoints encoded every
epoch) and through a plain fp32 loop, and prints samples per second for both, their ratio, peak
CUDA memory, and whether memory was released after the job. ``--model causal-lm`` trains the
character ``causal_lm`` of ``bench.overhead --preset causal-lm`` on builtin:fortunes instead, both
sides in bf16 autocast with the same seed and batch order, and prints training tokens per second.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


class NullHooks:
    """Hooks that keep nothing but the last checkpoint's size and the epoch metrics."""

    def __init__(self):
        self.epochs: list[dict] = []
        self.checkpoint_bytes = 0

    def on_metrics(self, scope, epoch, step, values):
        if scope == "epoch":
            self.epochs.append(values)

    def on_progress(self, epoch, step, fraction):
        pass

    def on_checkpoint(self, epoch, step, data, **_):
        self.checkpoint_bytes = len(data)

    def stop_reason(self):
        return None


def spec(epochs: int, batch_size: int, model: str = "transformer"):
    from app.jobs.schemas import parse_spec

    if model == "causal-lm":
        from bench.overhead import CAUSAL_LM

        return parse_spec({**CAUSAL_LM, "name": "gpu-smoke-causal-lm", "checkpoint": {"every_epochs": 1},
                           "hyperparameters": {**CAUSAL_LM["hyperparameters"], "epochs": epochs, "batch_size": batch_size},
                           "resources": {"device": "cuda", "precision": "bf16"}})
    return parse_spec({
        "kind": "train", "name": "gpu-smoke", "dataset": {"id": "builtin:digits"},
        "model": {"arch": "transformer", "d_model": 256, "nhead": 8, "num_layers": 4, "dim_feedforward": 1024},
        "hyperparameters": {"epochs": epochs, "batch_size": batch_size, "learning_rate": 0.0005, "seed": 0},
        "resources": {"device": "cuda"},
    })


def plain(spec_obj, bf16: bool = False) -> float:
    """Plain CUDA loop (fp32, or bf16 autocast); returns samples per second over all epochs.

    The batch order is Kiln's seeded one, so with ``bf16`` the work is the same as the job's.
    """
    from bench.plain import data_and_model
    from worker.ml.evaluation import loss_sum
    from worker.ml.progress import epoch_permutation

    hp = spec_obj.hyperparameters
    data, model = data_and_model(spec_obj)
    model = model.cuda()
    x, y = (torch.from_numpy(a).cuda() for a in data.splits["train"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate)
    torch.cuda.synchronize()
    started, seen = time.perf_counter(), 0
    for epoch in range(hp.epochs):
        order = epoch_permutation(len(x), hp.seed, epoch).cuda()
        for i in range(0, len(x), hp.batch_size):
            idx = order[i:i + hp.batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                outputs = model(x[idx])
            loss = loss_sum(data.task, outputs, y[idx]) / len(idx)
            loss.backward()
            opt.step()
            seen += len(idx)
    torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="256 (transformer) or 64 (causal-lm)")
    parser.add_argument("--model", choices=("transformer", "causal-lm"), default="transformer")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (this check needs a GPU)", file=sys.stderr)
        return 2
    if args.model == "causal-lm" and not torch.cuda.is_bf16_supported():
        print("this CUDA device has no bf16: the causal-lm check measures bf16 only", file=sys.stderr)
        return 2
    from worker.ml.training import train

    lm = args.model == "causal-lm"
    s = spec(args.epochs, args.batch_size or (64 if lm else 256), args.model)
    plain(s, bf16=lm)  # warm-up (kernels, allocator)
    baseline = plain(s, bf16=lm)
    hooks = NullHooks()
    result = train(s, hooks=hooks)
    kiln = sum(m["samples_per_sec"] for m in hooks.epochs[1:]) / max(len(hooks.epochs) - 1, 1)
    peak = max(m.get("cuda_peak_mem_mb", 0.0) for m in hooks.epochs)
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated() / 2**20
    print(f"device: {torch.cuda.get_device_name()}")
    if lm:
        # Every sample is one window of block_size tokens.
        block = s.model.block_size
        print(f"plain bf16 loop: {baseline * block:,.0f} tokens/s")
        print(f"kiln job (bf16, checkpoint per epoch): {kiln * block:,.0f} tokens/s  ratio plain/kiln "
              f"{baseline / kiln:.3f} (goal <= 1.05)")
    else:
        print(f"plain fp32 loop: {baseline:,.0f} samples/s")
        print(f"kiln job (bf16, checkpoint per epoch): {kiln:,.0f} samples/s  ratio {kiln / baseline:.2f}")
    quality = "test_perplexity" if lm else "test_accuracy"
    print(f"{quality}: {result.test_metrics.get(quality, float('nan')):.3f}  "
          f"peak CUDA memory: {peak:.0f} MiB  allocated after the job: {left:.1f} MiB  "
          f"checkpoint: {hooks.checkpoint_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
