"""GPU smoke check: a training job on CUDA through Kiln's loop versus a plain loop on the same GPU.

    python -m bench.gpu_smoke [--epochs 5] [--batch-size 256]
    python -m bench.gpu_smoke --model causal-lm [--epochs 5] [--batch-size 64]
    python -m bench.gpu_smoke --model minilm [--epochs 3] [--batch-size 32]
    python -m bench.gpu_smoke --model minilm --dry-run

Needs a CUDA device (exits 2 without one). Trains the same transformer on digits with the same
seed through ``worker.ml.training.train`` (bf16 autocast, pinned memory, checkpoints encoded every
epoch) and through a plain fp32 loop, and prints samples per second for both, their ratio, peak
CUDA memory, and whether memory was released after the job. ``--model causal-lm`` trains the
character ``causal_lm`` of ``bench.overhead --preset causal-lm`` on builtin:fortunes instead, both
sides in bf16 autocast with the same seed and batch order, and prints training tokens per second.
``--model minilm`` fine-tunes MiniLM (the ``pretrained`` arch, ``bench.overhead --preset minilm``)
next to the plain Hugging Face ``transformers`` loop of ``bench/minilm.py``, both in bf16 autocast,
and prints samples per second. ``--dry-run`` runs any of them on the CPU in fp32 with a tiny
workload (one epoch), to show the script works where no GPU is lent; its figures mean nothing,
but the two sides' final losses must be equal (same numerics on the CPU), or it exits 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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


def spec(epochs: int, batch_size: int, model: str = "transformer", device: str = "cuda"):
    from app.jobs.schemas import parse_spec

    precision = "bf16" if device == "cuda" else "fp32"
    if model in ("causal-lm", "minilm"):
        if model == "causal-lm":
            from bench.overhead import CAUSAL_LM as base
        else:
            from bench.minilm import SPEC as base

        return parse_spec({**base, "name": f"gpu-smoke-{model}", "checkpoint": {"every_epochs": 1},
                           "hyperparameters": {**base["hyperparameters"], "epochs": epochs, "batch_size": batch_size},
                           "resources": {"device": device, "precision": precision}})
    return parse_spec({
        "kind": "train", "name": "gpu-smoke", "dataset": {"id": "builtin:digits"},
        "model": {"arch": "transformer", "d_model": 256, "nhead": 8, "num_layers": 4, "dim_feedforward": 1024},
        "hyperparameters": {"epochs": epochs, "batch_size": batch_size, "learning_rate": 0.0005, "seed": 0},
        "resources": {"device": device},
    })


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain(spec_obj, bf16: bool = False, device: str = "cuda") -> tuple[float, float]:
    """Plain loop (fp32, or bf16 autocast); (samples per second over all epochs, final epoch's loss).

    The batch order is Kiln's seeded one, so with ``bf16`` the work is the same as the job's.
    """
    from bench.plain import data_and_model
    from worker.ml.evaluation import loss_sum
    from worker.ml.progress import epoch_permutation

    hp = spec_obj.hyperparameters
    data, model = data_and_model(spec_obj)
    model = model.to(device)
    x, y = (torch.from_numpy(a).to(device) for a in data.splits["train"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    _sync(device)
    started, seen = time.perf_counter(), 0
    for epoch in range(hp.epochs):
        order = epoch_permutation(len(x), hp.seed, epoch).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(x), hp.batch_size):
            idx = order[i:i + hp.batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                outputs = model(x[idx])
            loss = loss_sum(data.task, outputs, y[idx]) / len(idx)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(idx)
            seen += len(idx)
    _sync(device)
    return seen / (time.perf_counter() - started), float(total) / len(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="5 (3 for minilm; 1 with --dry-run)")
    parser.add_argument("--batch-size", type=int, default=None, help="256 (transformer), 64 (causal-lm), 32 (minilm)")
    parser.add_argument("--model", choices=("transformer", "causal-lm", "minilm"), default="transformer")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, fp32, one epoch of a tiny workload: checks the script, measures nothing")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (this check needs a GPU; --dry-run runs it on the CPU)",
              file=sys.stderr)
        return 2
    if not args.dry_run and args.model != "transformer" and not torch.cuda.is_bf16_supported():
        print(f"this CUDA device has no bf16: the {args.model} check measures bf16 only", file=sys.stderr)
        return 2
    epochs = args.epochs or (1 if args.dry_run else 3 if args.model == "minilm" else 5)
    batch = args.batch_size or {"transformer": 256, "causal-lm": 64, "minilm": 32}[args.model]
    if args.dry_run:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-smoke-") as tmp:
        if args.model == "minilm":
            return _minilm(epochs, batch, device, Path(tmp), dry_run=args.dry_run)
        return _kiln_models(args.model, epochs, batch, device, dry_run=args.dry_run)


def _kiln_models(model: str, epochs: int, batch: int, device: str, *, dry_run: bool) -> int:
    from worker.ml.training import train

    lm = model == "causal-lm"
    s = spec(epochs, batch, model, device)
    # The causal LM is measured in bf16 on both sides; the transformer's baseline stays fp32.
    plain_bf16 = lm and device == "cuda"
    plain(s, bf16=plain_bf16, device=device)  # warm-up (kernels, allocator)
    baseline, plain_loss = plain(s, bf16=plain_bf16, device=device)
    hooks = NullHooks()
    result = train(s, hooks=hooks)
    later = hooks.epochs[1:] or hooks.epochs
    kiln = sum(m["samples_per_sec"] for m in later) / len(later)
    _device_line(device)
    if lm:
        # Every sample is one window of block_size tokens.
        block = s.model.block_size
        print(f"plain {'bf16' if plain_bf16 else 'fp32'} loop: {baseline * block:,.0f} tokens/s")
        print(f"kiln job ({'bf16' if plain_bf16 else 'fp32'}, checkpoint per epoch): {kiln * block:,.0f} tokens/s  "
              f"ratio plain/kiln {baseline / kiln:.3f} (goal <= 1.05)")
    else:
        print(f"plain fp32 loop: {baseline:,.0f} samples/s")
        print(f"kiln job ({'bf16' if device == 'cuda' else 'fp32'}, checkpoint per epoch): {kiln:,.0f} samples/s  "
              f"ratio {kiln / baseline:.2f}")
    quality = "test_perplexity" if lm else "test_accuracy"
    print(f"{quality}: {result.test_metrics.get(quality, float('nan')):.3f}  "
          f"{_memory_line(hooks, device)}checkpoint: {hooks.checkpoint_bytes / 2**20:.1f} MiB")
    if dry_run:
        return _same_loss(plain_loss, result.final_metrics["train_loss"])
    return 0


def _minilm(epochs: int, batch: int, device: str, tmp: Path, *, dry_run: bool) -> int:
    """MiniLM fine-tuning through Kiln's loop and through the plain transformers loop, bf16 on CUDA."""
    from bench import minilm
    from worker.ml.training import train

    s = spec(epochs, batch, "minilm", device)
    csv = minilm.corpus_csv(tmp, per_category=16 if dry_run else 100)
    bf16 = device == "cuda"
    spec_dict = s.model_dump(mode="json")
    minilm.plain_loop(spec_dict, csv, device=device, bf16=bf16)  # warm-up (imports, kernels, allocator)
    done = minilm.plain_loop(spec_dict, csv, device=device, bf16=bf16)
    baseline = done["samples"] / done["train_seconds"]
    hooks = NullHooks()
    result = train(s, hooks=hooks, dataset_file=csv, dataset_format="csv")
    # Each epoch's training part alone (samples_per_sec), as the plain side's train_seconds.
    seen = done["samples"] / epochs
    kiln = len(hooks.epochs) * seen / sum(seen / m["samples_per_sec"] for m in hooks.epochs)
    precision = "bf16" if bf16 else "fp32"
    _device_line(device)
    print(f"plain transformers loop ({precision}): {baseline:,.1f} samples/s")
    print(f"kiln job ({precision}, checkpoint per epoch): {kiln:,.1f} samples/s  "
          f"ratio plain/kiln {baseline / kiln:.3f} (goal <= 1.05)")
    print(f"test_accuracy: {result.test_metrics.get('test_accuracy', float('nan')):.3f}  "
          f"{_memory_line(hooks, device)}checkpoint: {hooks.checkpoint_bytes / 2**20:.1f} MiB")
    if dry_run:
        return _same_loss(done["loss"], result.final_metrics["train_loss"])
    return 0


def _device_line(device: str) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run: the figures mean nothing)"
    print(f"device: {name}")


def _memory_line(hooks: NullHooks, device: str) -> str:
    if device != "cuda":
        return ""
    peak = max(m.get("cuda_peak_mem_mb", 0.0) for m in hooks.epochs)
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated() / 2**20
    return f"peak CUDA memory: {peak:.0f} MiB  allocated after the job: {left:.1f} MiB  "


def _same_loss(plain_loss: float, kiln_loss: float) -> int:
    equal = abs(plain_loss - kiln_loss) <= 1e-6
    print(f"final train loss: plain {plain_loss:.8f}  kiln {kiln_loss:.8f}  equal within 1e-6: {equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
