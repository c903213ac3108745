"""Built-in datasets: what a spec may name, and the shapes the web checks before queueing.

The web validates against this table without importing scikit-learn, statsmodels or torch; the
worker's loaders (``worker.ml.datasets``) must agree with it (a test checks both ways).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CLASSIFICATION = "classification"
REGRESSION = "regression"
FORECASTING = "forecasting"
TEXT_CLASSIFICATION = "text_classification"
IMAGE_CLASSIFICATION = "image_classification"
LANGUAGE_MODELING = "language_modeling"
SEQUENCE_TO_SEQUENCE = "sequence_to_sequence"
# Tasks whose model writes text (generation); every other task reads rows into one output each.
GENERATIVE_TASKS = (LANGUAGE_MODELING, SEQUENCE_TO_SEQUENCE)
TASKS = (CLASSIFICATION, REGRESSION, FORECASTING, TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, *GENERATIVE_TASKS)
# Tasks whose model outputs class scores (cross-entropy, accuracy and F1).
CLASSIFYING_TASKS = (CLASSIFICATION, TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION)


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset that ships inside a package (or is generated), addressed as ``builtin:<name>``."""

    name: str
    task: str
    source: str
    description: str
    num_rows: int
    columns: tuple[str, ...] = ()
    target: str | None = None
    num_features: int = 0
    num_classes: int | None = None
    # How sequence models read one tabular row: (steps, features per step).
    sequence_shape: tuple[int, int] | None = None
    default_window: int | None = None
    # Image datasets: (channels, height, width) as stored.
    image_shape: tuple[int, int, int] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # A corpus read from a system package's files (never imported): the file, and the Debian package.
    corpus_file: str | None = None
    package: str | None = None

    def available(self) -> bool:
        """Whether the data is present where Kiln runs (a packaged corpus may not be installed)."""
        return self.corpus_file is None or Path(self.corpus_file).is_file()


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset(
            "digits", CLASSIFICATION, "scikit-learn", "8x8 images of handwritten digits",
            num_rows=1797, target="digit", num_features=64, num_classes=10, sequence_shape=(8, 8),
        ),
        BuiltinDataset(
            "digits_images", IMAGE_CLASSIFICATION, "scikit-learn", "the digits as 8x8 grey images (for cnn2d)",
            num_rows=1797, target="digit", num_features=64, num_classes=10, image_shape=(1, 8, 8),
        ),
        BuiltinDataset(
            "iris", CLASSIFICATION, "scikit-learn", "Fisher's iris flowers", num_rows=150,
            target="species", num_features=4, num_classes=3,
        ),
        BuiltinDataset(
            "wine", CLASSIFICATION, "scikit-learn", "Chemical analysis of three wine cultivars",
            num_rows=178, target="cultivar", num_features=13, num_classes=3,
        ),
        BuiltinDataset(
            "breast_cancer", CLASSIFICATION, "scikit-learn", "Wisconsin diagnostic breast cancer",
            num_rows=569, target="diagnosis", num_features=30, num_classes=2,
        ),
        BuiltinDataset(
            "diabetes", REGRESSION, "scikit-learn", "Diabetes disease progression after one year",
            num_rows=442, target="progression", num_features=10,
        ),
        BuiltinDataset(
            "sunspots", FORECASTING, "statsmodels", "Yearly sunspot numbers 1700-2008",
            num_rows=309, columns=("SUNACTIVITY",), target="SUNACTIVITY", num_features=1,
            default_window=24,
        ),
        BuiltinDataset(
            "co2", FORECASTING, "statsmodels", "Weekly atmospheric CO2 at Mauna Loa (monthly means)",
            num_rows=526, columns=("co2",), target="co2", num_features=1, default_window=24,
        ),
        BuiltinDataset(
            "sine", FORECASTING, "synthetic", "A noisy sine wave (seeded, 2000 points)",
            num_rows=2000, columns=("value",), target="value", num_features=1, default_window=16,
        ),
        BuiltinDataset(
            "fortunes", LANGUAGE_MODELING, "Debian package fortunes",
            "The 'fortunes' file of fortune-mod: 431 short quotations as one text column (for causal_lm)",
            num_rows=431, columns=("text",), corpus_file="/usr/share/games/fortunes/fortunes", package="fortunes",
        ),
    )
}

BUILTIN_PREFIX = "builtin:"
UPLOAD_PREFIX = "dataset:"


def builtin(dataset_id: str) -> BuiltinDataset | None:
    """The built-in dataset named by ``builtin:<name>``, or None."""
    if not dataset_id.startswith(BUILTIN_PREFIX):
        return None
    return BUILTIN_DATASETS.get(dataset_id[len(BUILTIN_PREFIX):])
