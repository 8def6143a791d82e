"""`python -m leancnn.data.ensure NAME`: make sure a dataset is available
offline, installing Debian's package when running as root; otherwise say
exactly how to get it. Exit 0 when found or installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from ..errors import DataError
from .registry import load_dataset

DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}


def ensure(name: str) -> int:
    try:
        load_dataset(name)
        print(f"{name}: found")
        return 0
    except DataError as first_error:
        package = DEBIAN_PACKAGES.get(name)
        can_install = package and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0
        if not can_install:
            print(f"leancnn: error: {first_error}", file=sys.stderr)
            return 1
        print(f"{name}: not found; installing Debian package {package}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False, env=env)
    try:
        load_dataset(name)
        print(f"{name}: installed")
        return 0
    except DataError as error:
        print(f"leancnn: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(ensure(sys.argv[1] if len(sys.argv) > 1 else "fashion-mnist"))
