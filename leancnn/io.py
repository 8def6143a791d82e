"""Files: atomic writes (write to a temporary name in the same folder, then rename, so a killed
process never leaves a half-written file behind), and reads that fail with one line naming the file."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LeancnnError, first_line


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename tmp_path onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file should read like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(path: str | Path, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, _write)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json_file(path: str | Path) -> Any:
    """A JSON file's content; one clear line (LeancnnError) naming the file if it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise LeancnnError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeancnnError(f"{path}: not valid JSON ({exc})") from None


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict:
    """A safetensors file's tensors (never unpickles); one clear line naming the file if it is
    missing, truncated or not a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise LeancnnError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = first_line(exc)
        raise LeancnnError(f"{path}: not a readable safetensors file ({reason}); it may be truncated: "
                           "write it again (train or compress the run again)") from None


def slug(text: str, empty: str = "run") -> str:
    """A file name for `text`: every run of characters other than letters, digits, '_', '.'
    and '-' becomes one '_' ('dnr:density=0.1' -> 'dnr_density_0.1')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or empty
