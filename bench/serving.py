"""Serving figures: a warm inline prediction and micro-batched throughput, next to their bare baselines.

    python -m bench.serving [--requests 30] [--clients 64] [--per-client 4]

Baselines: a raw Celery no-op round trip plus the bare forward pass (in this process, model warm),
and the best bare batched forward pass of the same model. Goals: warm p50 <= 2x (round trip +
forward); batched throughput >= 0.5x the bare batched forward pass.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy.orm import Session

from app import storage
from app.models import Checkpoint, ModelVersion
from bench import figures
from bench.stack import Stack

ROW = [0.0] * 64


def _post(port: int, token: str, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _checkpoint(stack: Stack) -> bytes:
    with Session(stack.engine) as session:
        mv = session.query(ModelVersion).filter_by(name="bench-tiny").order_by(ModelVersion.version.desc()).first()
        ckpt = session.get(Checkpoint, mv.checkpoint_id)
        return storage.read_verified(stack.tmp / "storage", ckpt.path, ckpt.sha256)


def _throughput(port: int, token: str, clients: int, per_client: int) -> float:
    def client(_):
        for _ in range(per_client):
            status, body = _post(port, token, "/api/v1/models/bench-tiny@latest/predict?wait=60", {"inputs": [ROW]})
            if status != 200:
                raise RuntimeError(f"inline prediction answered {status}: {body}")
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return clients * per_client / (time.perf_counter() - started)


def main(argv=None) -> int:
    """Measure and print the serving figures; 1 if a goal is missed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-client", type=int, default=4)
    args = p.parse_args(argv)
    from worker.ml import configure_threads, prediction

    configure_threads(1)
    with tempfile.TemporaryDirectory(prefix="kiln-serving-") as tmp, Stack(Path(tmp), "sqlite") as stack:
        token = figures.user_token(stack)
        port = stack.serve("kiln-web", lambda port: [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread",
            "--threads", str(args.clients + 4), "app:create_app()"])
        figures.train_model(stack, figures.Api(port, token))
        data = _checkpoint(stack)
        forward = []
        for i in range(args.requests + 3):
            started = time.perf_counter()
            prediction.predict(data, [ROW])
            if i >= 3:
                forward.append((time.perf_counter() - started) * 1000)
        best_batch = 0.0
        for size in (1, 8, 32, 64, 256):
            started = time.perf_counter()
            for _ in range(5):
                prediction.predict(data, [ROW] * size)
            best_batch = max(best_batch, 5 * size / (time.perf_counter() - started))
        celery_ms = figures.celery_round_trip(stack, args.requests)
        results = {}
        for label, batch in (("batched", "32"), ("unbatched", "1")):
            os.environ["KILN_PREDICT_MAX_BATCH_SIZE"] = batch
            workers = stack.kiln_workers("predict", 1)
            try:
                if label == "batched":
                    inline = []
                    for i in range(args.requests + 3):
                        started = time.perf_counter()
                        status, body = _post(port, token, "/api/v1/models/bench-tiny@latest/predict?wait=60",
                                             {"inputs": [ROW]})
                        assert status == 200, body
                        if i >= 3:
                            inline.append((time.perf_counter() - started) * 1000)
                    results["inline"] = inline
                results[label] = _throughput(port, token, args.clients, args.per_client)
            finally:
                stack.stop(workers)
        os.environ.pop("KILN_PREDICT_MAX_BATCH_SIZE", None)
    base = statistics.median(celery_ms) + statistics.median(forward)
    p50, p95 = statistics.median(results["inline"]), _pct(results["inline"], 0.95)
    print(f"celery no-op round trip p50 {statistics.median(celery_ms):.1f} ms, p95 {_pct(celery_ms, 0.95):.1f} ms")
    print(f"bare forward pass (1 row) p50 {statistics.median(forward):.2f} ms, p95 {_pct(forward, 0.95):.2f} ms")
    print(f"kiln warm inline prediction p50 {p50:.1f} ms, p95 {p95:.1f} ms  (goal p50 <= {2 * base:.1f} ms)")
    print(f"throughput, {args.clients} clients: batched {results['batched']:.1f} req/s, "
          f"unbatched {results['unbatched']:.1f} req/s; bare batched forward {best_batch:.0f} rows/s "
          f"(goal >= {0.5 * best_batch:.0f})")
    return 0 if p50 <= 2 * base and results["batched"] >= 0.5 * best_batch else 1


if __name__ == "__main__":
    sys.exit(main())
