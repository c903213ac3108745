"""Overhead of running training as a Kiln job versus a plain PyTorch loop, in one invocation.

    .venv/bin/python -m bench.overhead --repeats 3
    .venv/bin/python -m bench.overhead --preset causal-lm --epochs 3 --repeats 3
    .venv/bin/python -m bench.overhead --preset minilm --repeats 3
    .venv/bin/python -m bench.overhead --preset small-mlp --repeats 3 --through-api

Both sides train the same model on the same data with the same seed and batch order, and do the
same evaluation: validation every epoch and one test evaluation at the end. The Kiln side is a real
job: a SQLite database, the runner, the recorder (a metrics row per epoch and step report, queued
and flushed by the process's heartbeat thread), and a safetensors checkpoint per epoch written
atomically with its sha256 (persisted by the process's checkpoint thread). It prints the median
wall time of each, their ratio (goal <= 1.05), the same for CPU time (all threads of the process:
on a shared machine the steadier figure), and both final losses.
The ``causal-lm`` preset trains a character-level ``causal_lm`` on ``builtin:fortunes`` (nanoGPT-sized
for a CPU: d_model 128, 4 layers, block_size 128) and also prints training tokens/s of each side.
The ``minilm`` preset fine-tunes the catalog's MiniLM (``pretrained``, base ``minilm-l6``) on 400
fortunes in four categories next to a plain Hugging Face ``transformers`` loop (``bench/minilm.py``)
and prints samples/s of each side.

``--through-api`` runs the Kiln side on the real path instead: a ``kiln web`` and one ``kiln worker``
(one torch thread) on their own SQLite database (or PostgreSQL, ``--backend``) and Redis
(``bench/stack.py``); each job is submitted with ``POST /api/v1/jobs`` and the bench reads its row
once it is done. It prints the worker's run (the job's ``started_at`` -> ``finished_at``: claim,
training, checkpoints, heartbeats, finish) and submit -> succeeded (from before the POST to the
row's ``finished_at``) next to the plain loop run in the bench's own process, and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.minilm import SPEC as MINILM

SPEC = {"kind": "train", "name": "overhead", "model": {"arch": "gru", "hidden_size": 128, "num_layers": 2},
        "dataset": {"id": "builtin:digits"},
        "hyperparameters": {"epochs": 8, "batch_size": 16, "learning_rate": 0.001, "seed": 0},
        "checkpoint": {"every_epochs": 1, "keep_last": 3}}
# Short epochs (about 0.1 s): the fixed cost of a checkpoint per epoch shows here.
SMALL = {**SPEC, "model": {"arch": "mlp", "hidden_sizes": [512, 512]},
         "hyperparameters": {"epochs": 15, "batch_size": 32, "learning_rate": 0.001, "seed": 0}}

# A nanoGPT-style character model; the same windows in the same seeded order on both sides (dropout
# draws from the same seeded generator in the same order, so the losses match to the bit).
CAUSAL_LM = {"kind": "train", "name": "overhead-causal-lm", "dataset": {"id": "builtin:fortunes"},
             "model": {"arch": "causal_lm", "d_model": 128, "nhead": 4, "num_layers": 4, "dim_feedforward": 512,
                       "block_size": 128, "positional": "learned", "tokenizer": "char", "tie_weights": True,
                       "dropout": 0.1},
             "hyperparameters": {"epochs": 3, "batch_size": 16, "learning_rate": 0.003, "seed": 0},
             "checkpoint": {"every_epochs": 1, "keep_last": 3}}
PRESETS = {"gru": SPEC, "small-mlp": SMALL, "causal-lm": CAUSAL_LM, "minilm": MINILM}


def plain_loop(spec_dict: dict) -> tuple[float, int]:
    """A careful hand-written loop: same data, model, optimizer, seed and batch order.

    Like the job it validates every epoch (loss, and accuracy or perplexity) and evaluates the test
    split once at the end. Returns the final train loss and the number of training tokens (token
    inputs) or samples seen.
    """
    from app.jobs.schemas import parse_spec
    from bench.plain import data_and_model
    from worker.ml.evaluation import CLASSIFYING, loss_sum
    from worker.ml.progress import epoch_permutation

    spec = parse_spec(spec_dict)
    hp = spec.hyperparameters
    data, model = data_and_model(spec)
    x, y = (torch.from_numpy(a) for a in data.splits["train"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)

    @torch.no_grad()
    def evaluate(split: str) -> dict[str, float]:
        xs, ys = (torch.from_numpy(a) for a in data.splits[split])
        model.eval()
        outputs = model(xs)
        loss = float(loss_sum(data.task, outputs, ys)) / max(len(xs), 1)
        model.train()
        if data.task in CLASSIFYING:
            return {"loss": loss, "accuracy": float((outputs.argmax(dim=1) == ys).float().mean())}
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp())}

    epoch_loss, trained = 0.0, 0
    for epoch in range(hp.epochs):
        model.train()
        order = epoch_permutation(len(x), hp.seed, epoch)
        total, seen = 0.0, 0
        for i in range(0, len(order), hp.batch_size):
            idx = order[i:i + hp.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_sum(data.task, model(x[idx]), y[idx]) / len(idx)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            trained += x[idx].numel() if data.signature.get("input_kind") == "tokens" else len(idx)
        epoch_loss = total / seen
        evaluate("val")  # validation each epoch, as any careful script does
    evaluate("test")
    return epoch_loss, trained


def _plain(spec_dict: dict, workdir: Path) -> tuple[float, int]:
    """The preset's plain loop: (final train loss, tokens or samples trained)."""
    if spec_dict["model"]["arch"] == "pretrained":
        from bench import minilm

        done = minilm.plain_loop(spec_dict, minilm.corpus_csv(workdir))
        return done["loss"], done["samples"]
    return plain_loop(spec_dict)


class KilnWorker:
    """Kiln's side: one SQLite database and storage root, jobs run one after another through the
    runner in this process, as one worker process runs them (its engine, statement cache, heartbeat
    and checkpoint threads stay warm between jobs, as they do in a worker)."""

    def __init__(self, workdir: Path):
        from app import settings as settings_module
        from app.accounts import create_user
        from app.db import session_scope
        from app.migrate import upgrade

        self.url = f"sqlite:///{workdir / 'bench.db'}"
        upgrade(self.url)
        self.settings = settings_module.SETTINGS.with_overrides(database_url=self.url,
                                                                storage_root=workdir / "storage")
        self.workdir, self.datasets = workdir, {}
        with session_scope(self.url) as s:
            self.user_id = create_user(session=s, email="bench@example.com")[0].id

    def run(self, spec_dict: dict) -> tuple[float, float, float]:
        """Submit ``spec_dict`` and run it through the runner: (wall and CPU seconds of the run, final train loss).

        Submitting (and uploading a dataset the first time) happens before the clock starts: only
        running the job (claim, training, per-epoch metrics and checkpoints, heartbeats, finish) is timed.
        """
        from app.db import session_scope
        from app.jobs import service
        from app.jobs.schemas import parse_spec
        from app.models import Job, User
        from worker import runner

        with session_scope(self.url) as s:
            user = s.get(User, self.user_id)
            if spec_dict["model"]["arch"] == "pretrained":  # the fine-tuning corpus, uploaded as a user would
                spec_dict = {**spec_dict, "dataset": {**spec_dict["dataset"], "id": self._upload(s, user)}}
            job_id = service.submit(session=s, owner=user, spec=parse_spec(spec_dict), settings=self.settings).id
        started, cpu = time.perf_counter(), time.process_time()
        outcome = runner.run(job_id, 0, worker="bench", settings=self.settings)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert outcome == "succeeded", outcome
        with session_scope(self.url) as s:
            return seconds, cpu, s.get(Job, job_id).result["final_metrics"]["train_loss"]

    def _upload(self, session, user) -> str:
        if "minilm" not in self.datasets:
            from app import datasets
            from bench import minilm

            csv = minilm.corpus_csv(self.workdir)
            uploaded = datasets.upload(session=session, owner=user, filename=csv.name, data=csv.read_bytes(),
                                       settings=self.settings)
            session.flush()
            self.datasets["minilm"] = f"dataset:{uploaded.id}"
        return self.datasets["minilm"]


class KilnStack:
    """Kiln's side through the real path: ``kiln web`` and one ``kiln worker`` on a private database
    and Redis; jobs go in with ``POST /api/v1/jobs``, one at a time."""

    def __init__(self, workdir: Path, backend: str):
        from bench import figures
        from bench.stack import Stack

        self.stack = Stack(workdir, backend).__enter__()
        try:
            python = sys.executable
            port = self.stack.serve("kiln-web", lambda port: [python, "-m", "app.cli", "web", "--port", str(port)])
            self.api = figures.Api(port, figures.user_token(self.stack))
            self.stack.kiln_workers("train", 1)
        except BaseException:
            self.stack.close()
            raise

    def run(self, spec_dict: dict) -> tuple[float, float, float]:
        """Submit ``spec_dict`` and wait for it: (worker run seconds, submit -> succeeded seconds, final train loss)."""
        from sqlalchemy.orm import Session

        from app.models import Job
        from bench import figures

        submitted = time.time()
        job_id = self.api.submit(spec_dict)
        # The row's timestamps are the figures, so polling every 0.1 s adds nothing to them.
        figures.wait_jobs(self.stack, [job_id], timeout=1800, poll=0.1)
        with Session(self.stack.engine) as session:
            job = session.get(Job, job_id)
            return ((job.finished_at - job.started_at).total_seconds(), job.finished_at.timestamp() - submitted,
                    job.result["final_metrics"]["train_loss"])

    def close(self) -> None:
        self.stack.close()


def through_api(spec: dict, repeats: int, backend: str) -> int:
    """The overhead of the real path (API -> queue -> worker -> recorder) over the plain loop."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as shared:
        kiln = KilnStack(Path(shared), backend)
        try:
            plain_loop(spec)  # warm-up of both sides: imports, dataset caches, the worker's first job
            kiln.run(spec)
            plain_times, runs, ends, losses = [], [], [], {}
            for i in range(repeats):
                for side in ("kiln", "plain") if i % 2 == 0 else ("plain", "kiln"):
                    if side == "kiln":
                        run, end, losses["kiln"] = kiln.run(spec)
                        runs.append(run)
                        ends.append(end)
                    else:
                        started = time.perf_counter()
                        losses["plain"], _ = plain_loop(spec)
                        plain_times.append(time.perf_counter() - started)
                print(f"run {i + 1}: plain {plain_times[-1]:.3f}s  kiln worker run {runs[-1]:.3f}s  "
                      f"submit -> succeeded {ends[-1]:.3f}s", flush=True)
        finally:
            kiln.close()
    plain, run, end = (statistics.median(t) for t in (plain_times, runs, ends))
    print(f"plain loop median:            {plain:.3f}s")
    print(f"kiln worker run median:       {run:.3f}s  (job started_at -> finished_at, {backend})")
    print(f"kiln submit -> succeeded:     {end:.3f}s  (POST /api/v1/jobs -> finished_at)")
    print(f"ratio worker run / plain:     {run / plain:.3f}  (goal <= 1.05)")
    print(f"ratio submit->succeeded/plain: {end / plain:.3f}")
    print(f"best of {repeats}:                    ratio {min(runs) / min(plain_times):.3f}  "
          f"submit->succeeded {min(ends) / min(plain_times):.3f}")
    equal = abs(losses["plain"] - losses["kiln"]) <= 1e-6
    print(f"final train loss:  plain {losses['plain']:.8f}  kiln {losses['kiln']:.8f}  "
          f"equal={losses['plain'] == losses['kiln']}  within 1e-6={equal}")
    return 0 if equal else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="gru")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="the job's checkpoint.every_epochs (default: the preset's, 1)")
    parser.add_argument("--through-api", action="store_true",
                        help="run the Kiln side through kiln web + kiln worker (API -> queue -> worker -> recorder)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the database of --through-api's stack")
    args = parser.parse_args(argv)
    if args.through_api and (args.threads != 1 or args.preset == "minilm"):
        parser.error("--through-api runs the worker on one torch thread, and not the minilm preset")
    torch.set_num_threads(args.threads)
    base = PRESETS[args.preset]
    spec = {**base, "hyperparameters": {**base["hyperparameters"], "epochs": args.epochs or base["hyperparameters"]["epochs"]}}
    if args.checkpoint_every:
        spec["checkpoint"] = {**spec["checkpoint"], "every_epochs": args.checkpoint_every}
    if args.through_api:
        return through_api(spec, args.repeats, args.backend)
    import logging

    logging.disable(logging.INFO)
    unit = {"causal-lm": "tokens", "minilm": "samples"}.get(args.preset)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as shared:
        worker = KilnWorker(Path(shared))
        # Warm-up of both sides (imports, dataset caches, allocator; a worker process's first job).
        _plain(spec, Path(shared))
        worker.run(spec)
        plain_times, kiln_times, losses = [], [], {}
        for i in range(args.repeats):
            # The two sides alternate which goes first, so neither always inherits the other's warm caches.
            for side in ("kiln", "plain") if i % 2 == 0 else ("plain", "kiln"):
                if side == "kiln":
                    seconds, cpu, losses["kiln"] = worker.run(spec)
                    kiln_times.append((seconds, cpu))
                else:
                    started, cpu = time.perf_counter(), time.process_time()
                    losses["plain"], trained = _plain(spec, Path(shared))
                    plain_times.append((time.perf_counter() - started, time.process_time() - cpu))
            print(f"run {i + 1}: plain {plain_times[-1][0]:.3f}s (cpu {plain_times[-1][1]:.3f}s)  "
                  f"kiln {kiln_times[-1][0]:.3f}s (cpu {kiln_times[-1][1]:.3f}s)", flush=True)
    plain, kiln = (statistics.median(t for t, _ in times) for times in (plain_times, kiln_times))
    plain_cpu, kiln_cpu = (statistics.median(c for _, c in times) for times in (plain_times, kiln_times))
    equal = abs(losses["plain"] - losses["kiln"]) <= 1e-6
    print(f"plain loop median: {plain:.3f}s  (cpu {plain_cpu:.3f}s)")
    print(f"kiln job median:   {kiln:.3f}s  (cpu {kiln_cpu:.3f}s)")
    if unit:
        # Both sides train the same rows, so throughput is what they trained over each wall time.
        print(f"{unit}/s:{' ' * (11 - len(unit))}plain {trained / plain:,.1f}  kiln {trained / kiln:,.1f}  "
              f"({trained:,} {unit})")
    print(f"ratio kiln/plain:  {kiln / plain:.3f}  (goal <= 1.05)   cpu {kiln_cpu / plain_cpu:.3f}")
    # On a shared machine the fastest run of each side is the least disturbed one (timeit's advice).
    best = (min(t for t, _ in kiln_times) / min(t for t, _ in plain_times),
            min(c for _, c in kiln_times) / min(c for _, c in plain_times))
    print(f"best of {args.repeats}:        ratio {best[0]:.3f}   cpu {best[1]:.3f}")
    print(f"final train loss:  plain {losses['plain']:.8f}  kiln {losses['kiln']:.8f}  "
          f"equal={losses['plain'] == losses['kiln']}  within 1e-6={equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
