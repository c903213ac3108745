"""Kiln's worker: Celery tasks over a Celery-free runner, and the PyTorch code in ``worker.ml``."""
