"""The training loop, in the shape of pytorch/examples mnist: ``train_epoch`` then ``evaluate``.

Metrics, progress and checkpoints leave through ``hooks``; ``hooks.stop_reason()`` is asked
before every optimizer step, and a stop saves a checkpoint at that exact position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.jobs.errors import UserError
from app.jobs.schemas import TrainSpec
from app.task_rules import architecture_error
from worker.ml import checkpoints
from worker.ml.architectures import ModelShape, build_model, parameter_counts
from worker.ml.datasets import load_table
from worker.ml.devices import (
    autocast_for, out_of_memory, release_cuda_memory, resolve_device, stage, to_device, uses_bf16,
)
from worker.ml.evaluation import evaluate, loss_sum, monitorable_metrics
from worker.ml.hooks import TrainingHooks
from worker.ml.optimization import build_optimizer, build_scheduler, current_lr, steps_per_epoch
from worker.ml.preparation import FORECASTING, PreparedData, prepare
from worker.ml.text import lsa_vectors
from worker.ml.progress import (
    Monitor, Progress, check_resumable, epoch_permutation, load_weights, restore_rng, rng_state,
)
from worker.ml.wide import WideNgrams

SIGNATURE_FORMAT = 1


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports back to the runner."""

    epochs_completed: int
    steps: int
    final_metrics: dict[str, float]
    test_metrics: dict[str, float]
    best_metric_name: str | None
    best_metric_value: float | None
    best_epoch: int | None
    signature: dict
    stopped: str | None
    resumed_from_epoch: int | None


@dataclass
class Run:
    """The fixed parts of one run: spec, data, model, optimizer, device and where reports go."""

    spec: TrainSpec
    hooks: TrainingHooks
    data: PreparedData
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    device: torch.device
    bf16: bool
    monitor: Monitor
    # The training split that batches are cut from: on the GPU already when it fits (see ``stage``).
    train_batches: tuple[torch.Tensor, torch.Tensor]
    best_weights: dict[str, torch.Tensor] | None = None
    progress: Progress = field(default_factory=Progress)
    # Throughput of the epoch under way, in this process (not saved: it is not reproducible).
    timing: dict[str, float] = field(default_factory=dict)

    def autocast(self):
        """The forward-pass autocast context of this run."""
        return autocast_for(self.device, self.bf16)


def train(
    spec: TrainSpec,
    *,
    hooks: TrainingHooks,
    dataset_file: Path | None = None,
    dataset_format: str | None = None,
    resume: bytes | None = None,
    init_from: bytes | None = None,
    device: str = "auto",
) -> TrainResult:
    """Train ``spec``'s model on its dataset, from scratch, a resume checkpoint, or init weights."""
    target = resolve_device(spec.resources.device if device == "auto" else device)
    try:
        return _train(spec, hooks, dataset_file, dataset_format, resume, init_from, target)
    except torch.cuda.OutOfMemoryError:
        pass  # leave the except block first, so the traceback's frames can free their tensors
    finally:
        if target.type == "cuda":
            # The worker process lives on: hand the cached blocks of this job back to the device.
            release_cuda_memory()
    raise out_of_memory(spec.hyperparameters.batch_size, target)


def _train(spec, hooks, dataset_file, dataset_format, resume, init_from, device) -> TrainResult:
    hp = spec.hyperparameters
    torch.manual_seed(hp.seed)
    saved = checkpoints.decode(resume) if resume is not None else None
    init = checkpoints.decode(init_from).served_weights if init_from is not None else None
    weights = saved.model if saved is not None else init
    spec = _without_wide_for_old_checkpoints(spec, weights)
    data = prepare(spec.dataset, load_table(spec.dataset, dataset_file, dataset_format), spec.model,
                   checkpoints.saved_text(saved) if saved is not None else None,
                   word_ngrams=_reads_word_ngrams(spec, weights))
    refused = architecture_error(spec.model.arch, data.task)
    if refused:
        raise UserError(refused)
    signature = {**data.signature, "arch": spec.model.arch, "model": spec.model.model_dump(mode="json"),
                 "format": SIGNATURE_FORMAT}
    model = build_model(spec.model, ModelShape.from_signature(signature)).to(device)
    # Every job states its size: the counts travel in the signature to the model version and result.
    signature.update(parameter_counts(model))
    if getattr(spec.model, "embedding_init", "random") == "lsa" and signature["input_kind"] == "tokens":
        _init_embeddings(model, data, hp.seed)
    if isinstance(getattr(model, "wide", None), WideNgrams):  # the token n-grams' idf, from the training split
        model.wide.fit_idf(torch.from_numpy(data.splits["train"][0]))
    elif data.word_ngrams_idf is not None:  # the word n-grams' idf, fitted with them
        model.wide.idf[1:] = torch.from_numpy(data.word_ngrams_idf).to(model.wide.idf)
    if init is not None:
        load_weights(model, init, "init_from")
    wide = getattr(model, "wide", None)
    if wide is not None:  # fitted before the deep part trains (below), then frozen
        wide.requires_grad_(False)
    tensors = {name: (torch.from_numpy(x), torch.from_numpy(y)) for name, (x, y) in data.splits.items()}
    num_batches = -(-len(tensors["train"][0]) // hp.batch_size)
    optimizer = build_optimizer(hp, model)
    scheduler = build_scheduler(hp, optimizer, steps_per_epoch(num_batches, hp.grad_accum_steps))
    monitor = Monitor.for_spec(spec, monitorable_metrics(data.task, has_validation=len(tensors["val"][0]) > 0))
    run = Run(spec, hooks, data, tensors, model, optimizer, scheduler, device,
              uses_bf16(device, spec.resources.precision), monitor, stage(*tensors["train"], device=device))
    resumed_from = None
    if saved is not None:
        resumed_from = _restore(run, saved, signature)
    elif wide is not None and init is None:
        _fit_wide(run)
    progress = run.progress
    while not progress.finished and progress.epoch < hp.epochs:
        reason = train_epoch(run)
        if reason is not None:
            save_checkpoint(run, signature, reason=reason)
            return _result(run, signature, {}, reason, resumed_from)
        _end_epoch(run, signature)
    progress.finished = True
    test_metrics = _test(run)
    hooks.on_progress(progress.epoch, progress.step, 1.0)
    return _result(run, signature, test_metrics, None, resumed_from)


def _without_wide_for_old_checkpoints(spec: TrainSpec, weights: dict[str, torch.Tensor] | None) -> TrainSpec:
    """The spec with ``wide: false`` when the checkpoint it resumes or starts from has no wide path.

    A job submitted before ``model.wide`` existed reads it as on (the default now), but its
    checkpoints hold no wide weights: it goes on as it was built.
    """
    if weights is None or not getattr(spec.model, "wide", False) or any(k.startswith("wide.") for k in weights):
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"wide": False})})


def _reads_word_ngrams(spec: TrainSpec, weights: dict[str, torch.Tensor] | None) -> bool:
    """Whether the wide path reads the text's word n-grams (:class:`WideTerms`).

    So it does when on, except for ``mlp`` + ``tfidf`` (its wide path reads its TF-IDF features) and
    for a run that resumes or starts from a checkpoint whose wide path read token n-grams.
    """
    if not getattr(spec.model, "wide", False) or getattr(spec.model, "tfidf", None) is not None:
        return False
    return weights is None or "wide.terms.weight" in weights


def _fit_wide(run: Run) -> None:
    """Fit the wide path as TF-IDF + logistic regression, and start the deep part at zero on top of it.

    The head's weights are zeroed and its bias takes the regression's, so the network starts as
    the fitted linear model. Validated, that start is the first candidate for the best weights
    (epoch 0): the deep part is kept only where it beats it by more than ``model.wide_min_gain``
    (:func:`_improves`). Reported as epoch 0's metrics.
    """
    model, progress = run.model, run.progress
    started = time.perf_counter()
    x, y = run.tensors["train"]
    bias = model.wide.fit(model.split(to_device(x, run.device))[1], to_device(y, run.device))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(bias.to(model.head.bias.dtype))
    metrics = {"wide_fit_time_s": time.perf_counter() - started}
    if len(run.tensors["val"][0]):
        val = _evaluate(run, "val")
        val.pop("naive_rmse", None)
        metrics.update({f"val_{k}": v for k, v in val.items()})
    run.hooks.on_metrics("epoch", 0, 0, metrics)
    if run.monitor.name in metrics:
        progress.best_value, progress.best_epoch, progress.best_step = metrics[run.monitor.name], 0, 0
        run.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _init_embeddings(model: torch.nn.Module, data: PreparedData, seed: int) -> None:
    """Token embeddings from latent semantic analysis of the training split (``embedding_init: lsa``)."""
    weight = model.embedding.weight
    ids = model.split(torch.from_numpy(data.splits["train"][0]))[0].numpy()
    vectors = lsa_vectors(ids, weight.shape[0], weight.shape[1], seed)
    with torch.no_grad():
        weight.copy_(torch.from_numpy(vectors).to(weight.dtype))


def train_epoch(run: Run) -> str | None:
    """Train from the current position to the end of the epoch; the stop reason if asked to stop.

    Losses stay on the device and are read back (a CPU-GPU sync) only every ``log_every_steps``
    and when the epoch ends or stops. They are summed in float64 in the same order as a Python
    float would be, so results are the same to the bit on every device path; on the CPU, where
    reading a loss costs no sync, they are summed as Python floats, sparing each step three tiny
    tensor operations.
    """
    hp, progress, model = run.spec.hyperparameters, run.progress, run.model
    x, y = run.train_batches
    order = epoch_permutation(len(x), hp.seed, progress.epoch).to(x.device)
    batches = [order[i:i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
    model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    started, seen = time.perf_counter(), 0
    on_cpu = run.device.type == "cpu"
    loss_sum_t = progress.loss_sum if on_cpu else torch.tensor(progress.loss_sum, dtype=torch.float64,
                                                               device=run.device)
    for first in range(progress.position, len(batches), hp.grad_accum_steps):
        reason = run.hooks.stop_reason()
        if reason:
            progress.loss_sum = float(loss_sum_t)
            return reason
        group = batches[first:first + hp.grad_accum_steps]
        group_samples = sum(len(b) for b in group)
        run.optimizer.zero_grad(set_to_none=True)
        group_loss = 0.0 if on_cpu else torch.zeros((), dtype=torch.float64, device=run.device)
        for indices in group:
            xb, yb = to_device(x[indices], run.device), to_device(y[indices], run.device)
            if run.data.augment is not None:
                xb = run.data.augment(xb, indices, hp.seed, progress.epoch)
            with run.autocast():
                outputs = model(xb)
            # Dividing the summed loss by the group's samples makes k accumulated micro-batches
            # take the same step as one batch k times larger.
            loss = loss_sum(run.data.task, outputs, yb) / group_samples
            loss.backward()
            group_loss += loss.item() if on_cpu else loss.detach().double()
        if hp.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        lr = current_lr(run.optimizer)
        run.optimizer.step()
        if run.scheduler is not None:
            run.scheduler.step()
        progress.step += 1
        progress.position = first + len(group)
        loss_sum_t += group_loss * group_samples
        progress.samples += group_samples
        seen += group_samples
        if progress.step % hp.log_every_steps == 0:
            run.hooks.on_metrics("step", progress.reported_epoch, progress.step,
                                 {"train_loss": float(group_loss), "lr": lr})
            fraction = (progress.epoch + progress.position / len(batches)) / hp.epochs
            run.hooks.on_progress(progress.reported_epoch, progress.step, min(fraction, 1.0))
    progress.loss_sum = float(loss_sum_t)
    elapsed = time.perf_counter() - started
    run.timing = {"samples_per_sec": seen / elapsed if elapsed > 0 else 0.0, "epoch_time_s": elapsed}
    return None


def _evaluate(run: Run, split: str) -> dict[str, float]:
    x, y = run.tensors[split]
    return evaluate(run.model, x, y, task=run.data.task, device=run.device, targets=run.data.targets,
                    batch_size=max(run.spec.hyperparameters.batch_size, 256), bf16=run.bf16)


def _end_epoch(run: Run, signature: dict) -> None:
    """Validate, report, track the best weights, decide on early stopping, and checkpoint."""
    hp, progress = run.spec.hyperparameters, run.progress
    started = time.perf_counter()
    timing = run.timing
    metrics = {"train_loss": progress.loss_sum / max(progress.samples, 1), "lr": current_lr(run.optimizer)}
    if len(run.tensors["val"][0]):
        val = _evaluate(run, "val")
        val.pop("naive_rmse", None)
        metrics.update({f"val_{k}": v for k, v in val.items()})
    metrics["samples_per_sec"] = timing.get("samples_per_sec", 0.0)
    metrics["epoch_time_s"] = timing.get("epoch_time_s", 0.0) + time.perf_counter() - started
    if run.device.type == "cuda":
        metrics["cuda_peak_mem_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    progress.epoch += 1
    progress.position, progress.loss_sum, progress.samples = 0, 0.0, 0
    progress.last_metrics = metrics
    run.hooks.on_metrics("epoch", progress.epoch, progress.step, metrics)
    run.hooks.on_progress(progress.epoch, progress.step, progress.epoch / hp.epochs)
    value = metrics[run.monitor.name]
    improved = _improves(run, value)
    if improved:
        progress.best_value, progress.best_epoch, progress.best_step = value, progress.epoch, progress.step
        progress.bad_epochs = 0
        run.best_weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    else:
        progress.bad_epochs += 1
    stopping = hp.early_stopping
    if progress.epoch >= hp.epochs or (stopping is not None and progress.bad_epochs >= stopping.patience):
        progress.finished = True
    if progress.finished or progress.epoch % run.spec.checkpoint.every_epochs == 0:
        save_checkpoint(run, signature, reason="periodic", metric_name=run.monitor.name,
                        metric_value=value, is_best=improved)


def _improves(run: Run, value: float) -> bool:
    """Whether ``value`` beats the best so far; the fitted linear start (epoch 0) by more than ``model.wide_min_gain``.

    A small validation split picks the deep part over the linear model by chance as often as not
    when they are close; the margin keeps the linear model unless the deep part is clearly better.
    """
    progress = run.progress
    margin = getattr(run.spec.model, "wide_min_gain", 0.0) if progress.best_epoch == 0 else 0.0
    return run.monitor.improves(value, progress.best_value, margin=margin)


def save_checkpoint(run: Run, signature: dict, *, reason: str, metric_name: str | None = None,
                    metric_value: float | None = None, is_best: bool = False) -> None:
    """Take the run's exact state and hand it, laid out as safetensors, to ``hooks.on_checkpoint``.

    Only copies are taken here, of the tensors that training goes on changing in place (weights,
    optimizer moments): encoding, hashing and writing the file are left to the hooks (the worker's
    checkpoint thread), so training goes on meanwhile. The checkpoint of a finished run holds no
    optimizer or scheduler state: nothing trains on from it (a resume of a finished run only
    evaluates, ``init_from`` reads the weights), and the optimizer's moments are two thirds of an
    Adam checkpoint's bytes.
    """
    progress = run.progress
    data = run.data
    at_best = progress.best_step == progress.step
    training_goes_on = not progress.finished
    if at_best and run.best_weights is not None and run.device.type == "cpu":
        # The copy of the best weights taken at this very step: nothing changes it in place.
        weights = run.best_weights
    else:
        weights = {name: checkpoints.host_copy(t) for name, t in run.model.state_dict().items()}
    optimizer = None
    if training_goes_on:
        state = run.optimizer.state_dict()
        optimizer = {"param_groups": state["param_groups"],
                     "state": {index: {name: checkpoints.host_copy(v) if isinstance(v, torch.Tensor) else v
                                       for name, v in values.items()}
                               for index, values in state["state"].items()}}
    encoded = checkpoints.Encoded.of(checkpoints.Checkpoint(
        model=weights,
        signature=signature,
        spec=run.spec.model_dump(mode="json"),
        training=progress.to_dict(),
        optimizer=optimizer,
        scheduler=run.scheduler.state_dict() if run.scheduler is not None and training_goes_on else None,
        rng=rng_state(run.device),
        best_model=None if at_best else run.best_weights,  # replaced on improvement, never changed in place
        normalizer=checkpoints.pack_standardizers(data.features, data.targets, data.featurizer),
        **checkpoints.text_entries(data),
    ))
    run.hooks.on_checkpoint(progress.reported_epoch, progress.step, encoded, metric_name=metric_name,
                            metric_value=metric_value, is_best=is_best, reason=reason)


def _restore(run: Run, saved: checkpoints.Checkpoint, signature: dict) -> int:
    """Load a resume checkpoint into the run; the number of epochs it had completed."""
    check_resumable(saved, signature)
    load_weights(run.model, saved.model, "resume")
    if saved.optimizer is not None:
        run.optimizer.load_state_dict(saved.optimizer)
    if run.scheduler is not None and saved.scheduler is not None:
        run.scheduler.load_state_dict(saved.scheduler)
    run.progress = Progress.from_dict(saved.training)
    if saved.best_model is not None:
        run.best_weights = {k: v.to(run.device) for k, v in saved.best_model.items()}
    elif run.progress.best_step == run.progress.step:
        run.best_weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    # Last, so nothing above draws from the generators after they are put back.
    restore_rng(saved.rng, run.device)
    return run.progress.epoch


def _test(run: Run) -> dict[str, float]:
    """Evaluate the best weights on the test split and report them (empty without a test split)."""
    if not len(run.tensors["test"][0]):
        return {}
    if run.best_weights is not None:
        run.model.load_state_dict(run.best_weights)
    metrics = {f"test_{k}": v for k, v in _evaluate(run, "test").items()}
    if run.data.task != FORECASTING:
        metrics.pop("test_naive_rmse", None)
    run.hooks.on_metrics("test", run.progress.epoch, run.progress.step, metrics)
    return metrics


def _result(run: Run, signature: dict, test_metrics: dict, stopped: str | None, resumed_from: int | None):
    progress = run.progress
    return TrainResult(
        epochs_completed=progress.epoch, steps=progress.step, final_metrics=dict(progress.last_metrics),
        test_metrics=test_metrics, best_metric_name=run.monitor.name, best_metric_value=progress.best_value,
        best_epoch=progress.best_epoch, signature=signature, stopped=stopped, resumed_from_epoch=resumed_from,
    )
