"""Images for the 2-D models: reading uploads, resizing, normalising, and seeded augmentation.

Pixels become float tensors (channels, side, side) in [0, 1]; normalisation uses per-channel
statistics of the training split, which travel in the signature and the checkpoint. Augmentation
(a random horizontal flip, a random crop of a padded image) touches training batches only, and
each image's draw comes from a generator seeded by (seed, epoch, image index), so a run resumed
mid-epoch augments every remaining image exactly as the uninterrupted run did.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from app import images
from app.catalog import IMAGE_CLASSIFICATION
from app.jobs.errors import UserError
from app.jobs.schemas import ImageAugmentation


def read_archive(path: Path) -> tuple[list[bytes], pd.DataFrame]:
    """Encoded images and a one-column frame of their labels, from a zip of class folders."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = images.list_members(archive)
            encoded = [images.read_member(archive, m) for m in members]
    except zipfile.BadZipFile:
        raise UserError("the dataset file is not a zip archive") from None
    except images.ImageError as exc:
        raise UserError(str(exc)) from None
    return encoded, pd.DataFrame({images.LABEL_COLUMN: [m.label for m in members]})


def to_pixels(encoded: bytes, what: str, channels: int, side: int) -> torch.Tensor:
    """One encoded image as a float tensor (channels, side, side) in [0, 1], resized with antialiasing."""
    try:
        image = images.decode_rgb(encoded, what, "L" if channels == 1 else "RGB")
    except images.ImageError as exc:
        raise UserError(str(exc)) from None
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
    pixels = pixels.reshape(image.size[1], image.size[0], channels).permute(2, 0, 1)
    return resize(pixels.unsqueeze(0), side)[0]


def resize(batch: torch.Tensor, side: int) -> torch.Tensor:
    """A batch (n, channels, h, w) resized to (n, channels, side, side) (bilinear, antialiased)."""
    if batch.shape[-2:] == (side, side):
        return batch
    return F.interpolate(batch, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def pixels_of(encoded: list, what: str, channels: int, side: int) -> np.ndarray:
    """Many encoded images as a float32 array (n, channels, side, side); ``what`` names one by index."""
    return torch.stack([to_pixels(e, what.format(i=i), channels, side) for i, e in enumerate(encoded)]).numpy()


def channel_statistics(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation, shaped (channels, 1, 1) to broadcast over images."""
    mean = pixels.astype(np.float64).mean(axis=(0, 2, 3))
    std = pixels.astype(np.float64).std(axis=(0, 2, 3))
    std = np.where(std > 1e-12, std, 1.0)
    return mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)


def _draw(seed: int, epoch: int, index: int, padding: int) -> tuple[bool, int, int]:
    """One image's flip and crop offsets: a function of (seed, epoch, image index) only."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))
    flip, dy, dx = generator.integers(0, 2), generator.integers(0, 2 * padding + 1), generator.integers(0, 2 * padding + 1)
    return bool(flip), int(dy), int(dx)


@dataclass(frozen=True)
class Augmenter:
    """Random flips and padded crops of a training batch, seeded per image."""

    config: ImageAugmentation

    def __call__(self, batch: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """The batch (n, channels, h, w) with each image flipped and cropped by its own draw."""
        padding = self.config.crop_padding
        height, width = batch.shape[-2:]
        # Zero padding after normalisation pads with the training mean colour.
        padded = F.pad(batch, (padding,) * 4) if padding else batch
        out = []
        for image, index in zip(padded, indices.tolist()):
            flip, dy, dx = _draw(seed, epoch, index, padding)
            image = image[:, dy:dy + height, dx:dx + width]
            out.append(image.flip(-1) if flip and self.config.horizontal_flip else image)
        return torch.stack(out)


def augmenter(task: str, config: ImageAugmentation | None) -> Augmenter | None:
    """The training-batch augmentation a dataset asks for (images only), or None."""
    if config is None or task != IMAGE_CLASSIFICATION:
        return None
    if not config.horizontal_flip and not config.crop_padding:
        return None
    return Augmenter(config)
