"""Serving figures: warm inline predictions and micro-batched throughput, next to their bare baselines.

    python -m bench.serving [--requests 30] [--clients 64] [--per-client 4] [--rounds 3]
    python -m bench.serving --tiny-only --backend postgresql --requests 60   # latency of the tiny MLP only

Two served models, both real Kiln model versions trained in the run:

- ``bench-tiny``: the digits MLP (64 numbers in, one hidden layer of 16). Its forward pass takes
  microseconds, so its inline latency is Kiln's own cost per request: HTTP, the job row, the
  broker, the claim, the finish, the wake-up.
- ``bench-text``: MiniLM-L6 (22.7 M parameters, 6 layers, the catalog's sentence encoder) with a
  classification head, fine-tuned on short sentences: a realistically sized text classifier whose
  forward pass costs milliseconds on a CPU thread. The throughput figure uses it: for a model
  whose batched forward pass costs microseconds per row, no service with an HTTP request per row
  could reach half the bare rate, whatever it did.

Baselines, in this process with the model warm and one torch thread (as each worker has): a raw
Celery no-op round trip plus the bare forward pass of one row; the best bare batched forward pass
(the fastest batch size of 1 to 64, rows per second). Goals: warm inline p50 <= 2x (round trip +
forward); batched throughput with 64 concurrent clients >= 0.5x the bare batched forward pass.
Throughput runs in rounds, each measuring the bare baseline, then Kiln with and without
micro-batching (switched through the model version's own serving settings, ``PUT .../serving``,
on the same running worker, which loaded both models at start: ``bench-*@production`` are warm
aliases); the ratio is the median of the rounds' ratios. Next to the wall-clock figures it prints
the CPU time per request of the web and worker processes (from ``/proc``), which a shared
machine's load changes far less than the wall clock.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy.orm import Session

from app import storage
from app.models import Checkpoint, ModelVersion, User
from bench import figures
from bench.stack import Stack

ROW = [0.0] * 64
WORDS = ("river market engine garden signal winter harbour lantern meadow circuit bridge orchard "
         "thunder library canyon violin compass ember glacier festival").split()
TOPICS = {"weather": "storm rain cloud wind", "music": "song chord rhythm melody", "trade": "price goods ship coin"}
BATCH_SIZES = (1, 8, 16, 32, 64)


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (text, label) pairs of 25 to 45 words (a short review or support message): a topic's
    words among common ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = sorted(TOPICS)[i % len(TOPICS)]
        words = [rng.choice(WORDS) for _ in range(rng.randint(22, 42))] + rng.sample(TOPICS[label].split(), 3)
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def _request(port: int, token: str, method: str, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    data = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, data


def _predict(port: int, token: str, ref: str, row) -> float:
    """Milliseconds for one inline prediction of one row (raises unless it answered 200)."""
    started = time.perf_counter()
    status, body = _request(port, token, "POST", f"/api/v1/models/{ref}/predict?wait=60", {"inputs": [row]})
    if status != 200 or body.get("state") != "succeeded":
        raise RuntimeError(f"inline prediction answered {status}: {str(body)[:500]}")
    return (time.perf_counter() - started) * 1000


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _checkpoint(stack: Stack, name: str) -> bytes:
    with Session(stack.engine) as session:
        mv = session.query(ModelVersion).filter_by(name=name).order_by(ModelVersion.version.desc()).first()
        ckpt = session.get(Checkpoint, mv.checkpoint_id)
        return storage.read_verified(stack.tmp / "storage", ckpt.path, ckpt.sha256)


def _train_text_model(stack: Stack, api: figures.Api, texts: list[tuple[str, str]]) -> None:
    """Upload the sentences and fine-tune the MiniLM classifier's head on them (a train worker, stopped after)."""
    from app import datasets
    from app.settings import SETTINGS

    settings = SETTINGS.with_overrides(database_url=stack.database_url, storage_root=stack.tmp / "storage")
    csv = "text,label\n" + "".join(f"{text},{label}\n" for text, label in texts)
    with Session(stack.engine) as session:
        owner = session.query(User).order_by(User.id.desc()).first()
        dataset = datasets.upload(session=session, owner=owner, filename="sentences.csv", data=csv.encode(),
                                  settings=settings)
        session.commit()
        dataset_id = dataset.id
    spec = {"kind": "train", "name": "bench-text",
            "dataset": {"id": f"dataset:{dataset_id}", "target": "label", "text_column": "text"},
            "model": {"arch": "pretrained", "base": "minilm-l6", "freeze": "all_but_head", "max_length": 96},
            "hyperparameters": {"epochs": 1, "batch_size": 16, "seed": 0}}
    workers = stack.kiln_workers("train", 1)
    try:
        figures.wait_jobs(stack, [api.submit(spec)], timeout=900, poll=0.2)
    finally:
        stack.stop(workers)


def _single_forward(data: bytes, rows: list, count: int) -> list[float]:
    """Milliseconds of ``count`` one-row forward passes (after 3 unmeasured ones)."""
    from worker.ml import prediction

    samples = []
    for i in range(count + 3):
        started = time.perf_counter()
        prediction.predict(data, [rows[i % len(rows)]])
        if i >= 3:
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def _batched_forward(data: bytes, rows: list, size: int) -> tuple[float, float]:
    """Rows per second of bare forward passes of ``size`` rows (at least 64 rows in all), and CPU
    milliseconds per row."""
    from worker.ml import prediction

    batch = [rows[i % len(rows)] for i in range(size)]
    prediction.predict(data, batch)
    repeats = max(2, 64 // size)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        prediction.predict(data, batch)
    rows_done = repeats * size
    return rows_done / (time.perf_counter() - started), (time.process_time() - cpu) * 1000 / rows_done


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its living descendants."""
    tick, total, pending = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # it ended meanwhile
    return total


def _throughput(port: int, token: str, ref: str, rows: list, clients: int, per_client: int,
                pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    """Inline predictions per second (one row each) with ``clients`` concurrent clients, and the CPU
    milliseconds per request each process in ``pids`` (name -> pid) spent meanwhile."""
    def client(index: int) -> None:
        for j in range(per_client):
            _predict(port, token, ref, rows[(index * per_client + j) % len(rows)])
    cpu = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    rate = clients * per_client / (time.perf_counter() - started)
    return rate, {name: (_cpu_seconds(pid) - cpu[name]) * 1000 / (clients * per_client) for name, pid in pids.items()}


def _set_batching(port: int, token: str, name: str, size: int) -> None:
    status, body = _request(port, token, "PUT", f"/api/v1/models/{name}/versions/1/serving",
                            {"max_batch_size": size, "max_delay_ms": 2})
    if status != 200:
        raise RuntimeError(f"PUT serving settings answered {status}: {body}")


def main(argv=None) -> int:
    """Measure and print the serving figures; 1 if a goal is missed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=30, help="sequential inline predictions per model (latency)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-client", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (bare, batched, unbatched each)")
    p.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--tiny-only", action="store_true",
                   help="only the tiny MLP's warm inline latency (no MiniLM, no throughput rounds)")
    args = p.parse_args(argv)
    from worker.ml import configure_threads

    configure_threads(1)
    texts = sentences(96)
    rows = [text for text, _ in texts]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kiln-serving-") as tmp, Stack(Path(tmp), args.backend) as stack:
        token = figures.user_token(stack)
        port = stack.serve("kiln-web", lambda port: [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread",
            "--threads", str(args.clients + 4), "app:create_app()"])
        web_pid = stack.procs[-1].pid
        api = figures.Api(port, token)
        figures.train_model(stack, api)
        names = ("bench-tiny",) if args.tiny_only else ("bench-tiny", "bench-text")
        if not args.tiny_only:
            _train_text_model(stack, api, texts)
        data = {name: _checkpoint(stack, name) for name in names}
        single = {"bench-tiny": _single_forward(data["bench-tiny"], [ROW], args.requests)}
        best_size = None
        if not args.tiny_only:
            single["bench-text"] = _single_forward(data["bench-text"], rows, args.requests)
            # The batch size at which the bare forward pass is fastest, used in every round.
            best_size = max(BATCH_SIZES, key=lambda size: _batched_forward(data["bench-text"], rows, size)[0])
        celery_ms = figures.celery_round_trip(stack, args.requests)
        for name in names:  # loaded by the prediction worker when it starts
            status, body = _request(port, token, "PUT", f"/api/v1/models/{name}/aliases/production",
                                    {"version": 1, "serving": {"warm": True}})
            if status != 200:
                raise RuntimeError(f"PUT alias answered {status}: {body}")
        workers = stack.kiln_workers("predict", 1)
        pids = {"web": web_pid, "worker": workers[0].pid}
        try:
            latency, latency_cpu = {}, {}
            for name, model_rows in (("bench-tiny", [ROW]), ("bench-text", rows))[:len(names)]:
                ref = f"{name}@production"
                for i in range(3):  # the HTTP path warm too
                    _predict(port, token, ref, model_rows[i % len(model_rows)])
                cpu = {who: _cpu_seconds(pid) for who, pid in pids.items()}
                latency[name] = [_predict(port, token, ref, model_rows[i % len(model_rows)])
                                 for i in range(args.requests)]
                latency_cpu[name] = {who: (_cpu_seconds(pid) - cpu[who]) * 1000 / args.requests
                                     for who, pid in pids.items()}
            rounds: list[dict] = []
            for _ in range(0 if args.tiny_only else args.rounds):  # the baseline and Kiln alternate, so load changes hit both
                bare_rate, bare_cpu = _batched_forward(data["bench-text"], rows, best_size)
                measured = {"bare": bare_rate, "bare_cpu": bare_cpu}
                for label, size in (("batched", 32), ("unbatched", 1)):
                    _set_batching(port, token, "bench-text", size)
                    measured[label], measured[label + "_cpu"] = _throughput(
                        port, token, "bench-text@production", rows, args.clients, args.per_client, pids)
                rounds.append(measured)
        finally:
            stack.stop(workers)
    load_after = os.getloadavg()
    return _report(args, load_before, load_after, celery_ms, single, latency, latency_cpu, rounds, best_size)


def _report(args, load_before, load_after, celery_ms, single, latency, latency_cpu, rounds, best_size) -> int:
    """Print the figures; 1 if a goal is missed."""
    median = statistics.median
    celery_p50 = median(celery_ms)
    met = True
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"{args.backend}: celery no-op round trip p50 {celery_p50:.1f} ms, p95 {_pct(celery_ms, 0.95):.1f} ms")
    for name in latency:
        goal = 2 * (celery_p50 + median(single[name]))
        p50, p95 = median(latency[name]), _pct(latency[name], 0.95)
        met &= p50 <= goal
        cpu = latency_cpu[name]
        print(f"{name}: bare forward (1 row) p50 {median(single[name]):.2f} ms; kiln warm inline p50 {p50:.1f} ms, "
              f"p95 {p95:.1f} ms (goal p50 <= {goal:.1f} ms: {'met' if p50 <= goal else 'missed'}); "
              f"CPU per request: web {cpu['web']:.1f} ms, worker {cpu['worker']:.1f} ms")
    if not rounds:
        return 0 if met else 1
    ratios = [r["batched"] / r["bare"] for r in rounds]
    ratio = median(ratios)
    met &= ratio >= 0.5
    print(f"bench-text throughput, {args.clients} clients x {args.per_client}, {len(rounds)} rounds (medians): "
          f"bare batched forward {median(r['bare'] for r in rounds):.1f} rows/s (batch of {best_size}, "
          f"{median(r['bare_cpu'] for r in rounds):.1f} ms CPU per row); "
          f"batched {median(r['batched'] for r in rounds):.1f} req/s, unbatched {median(r['unbatched'] for r in rounds):.1f} req/s; "
          f"batched/bare {ratio:.2f} per round {[round(x, 2) for x in ratios]} (goal >= 0.5: {'met' if ratio >= 0.5 else 'missed'})")
    for label in ("batched", "unbatched"):
        print(f"  {label}: CPU per request: web {median(r[label + '_cpu']['web'] for r in rounds):.1f} ms, "
              f"worker {median(r[label + '_cpu']['worker'] for r in rounds):.1f} ms")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
