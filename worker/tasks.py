"""Thin Celery tasks: take a job id and its fencing token, hand them to the runner."""

from __future__ import annotations

from app import webhooks
from app.queue import PREDICT_TASK, TRAIN_TASK, WEBHOOK_TASK
from app.settings import SETTINGS
from worker import runner
from worker.celery_app import celery

# Webhook outbox rows this process commits (state changes, checkpoints) are published at once.
webhooks.configure(SETTINGS)


@celery.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def train(self, job_id: int, token: int) -> str:
    """Run one attempt of a training job (a duplicate message finds it unclaimable and returns)."""
    return runner.run(int(job_id), int(token), worker=self.request.hostname or "worker", settings=SETTINGS)


@celery.task(name=PREDICT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def predict(self, job_id: int, token: int) -> str:
    """Run a prediction job."""
    return runner.run(int(job_id), int(token), worker=self.request.hostname or "worker", settings=SETTINGS)


@celery.task(name=WEBHOOK_TASK, acks_late=True, ignore_result=True)
def webhook(delivery_id: int) -> str:
    """One attempt at a webhook delivery (claimed first, so a duplicate message does nothing)."""
    return webhooks.deliver(int(delivery_id), settings=SETTINGS)
