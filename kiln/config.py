"""Where the user CLI keeps the server URL and token: a TOML file readable by its owner only (0600)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path


def config_path() -> Path:
    """``$KILN_CONFIG``, else ``$XDG_CONFIG_HOME/kiln/config.toml``, else ``~/.config/kiln/config.toml``."""
    if explicit := os.environ.get("KILN_CONFIG"):
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kiln" / "config.toml"


def load() -> dict[str, str]:
    """The stored ``url`` and ``token`` (an empty dict when nothing was stored)."""
    path = config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return {k: v for k, v in data.items() if k in ("url", "token") and isinstance(v, str)}


def save(url: str, token: str) -> Path:
    """Store ``url`` and ``token``, replacing the file atomically; it is never readable by others, not even briefly."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A JSON string literal (ASCII-escaped) is a valid TOML basic string.
    text = f"url = {json.dumps(url)}\ntoken = {json.dumps(token)}\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask could only narrow it, but an old leftover temp file could be wider
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path
