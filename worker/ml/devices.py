"""Choosing the device and precision, moving batches there, and turning CUDA OOM into advice."""

from __future__ import annotations

import contextlib
import gc

import torch

from app.jobs.errors import OutOfMemory, UserError


def resolve_device(requested: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a CUDA device is a user error."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError("the job asks for device 'cuda' but this worker has no CUDA device; "
                            "use device 'auto' or 'cpu'")
        return torch.device(requested)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise UserError(f"unknown device {requested!r}; use 'auto', 'cpu' or 'cuda'")


def device_kind(requested: str) -> str | None:
    """The kind of device (``cpu``, ``cuda``) a job asking for ``requested`` runs on here; None if it cannot."""
    try:
        return resolve_device(requested).type
    except UserError:
        return None


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA when the job allows it (``auto`` or ``bf16``) and the GPU supports it."""
    if device.type != "cuda" or precision == "fp32":
        return False
    return torch.cuda.is_bf16_supported()


def autocast_for(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """The autocast context for forward passes (a no-op unless bf16 on CUDA)."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU batch to ``device``; through pinned memory, without blocking, on CUDA."""
    if device.type != "cuda" or tensor.is_cuda:
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


# A training split at most this large (and at most a quarter of the free GPU memory) is copied to
# the GPU once per job; batches are then cut there, with no host-to-device copy per step.
STAGE_LIMIT_BYTES = 2 * 2**30


def stage(x: torch.Tensor, y: torch.Tensor, *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors that training batches are cut from: on a CUDA ``device`` when they fit, else as given.

    Batches cut from tensors left on the CPU go through ``to_device`` (pinned, non-blocking).
    """
    if device.type != "cuda":
        return x, y
    size = x.nbytes + y.nbytes
    free, _total = torch.cuda.mem_get_info(device)
    if size > min(STAGE_LIMIT_BYTES, free // 4):
        return x, y
    return x.to(device), y.to(device)


def release_cuda_memory() -> None:
    """Free cached CUDA blocks after a job (or a failure) so the next job on this GPU starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory(batch_size: int | None, device: torch.device) -> OutOfMemory:
    """An OutOfMemory failure that says what to shrink."""
    release_cuda_memory()
    batch = f"a smaller batch_size (this job used {batch_size})" if batch_size else "fewer inputs per request"
    return OutOfMemory(f"{device} ran out of memory; try {batch}, a smaller model "
                       "(fewer layers or hidden units), or a shorter window / max_tokens")
