"""Compiled inference kernels.

One kernel computes every sparse 3x3 (and, as its centre tap, 1x1) convolution:
pre-defined sparse supports (pSConv) and irregular masks (DNR, magnitude pruning)
alike; filters that share a support are grouped (leancnn/kernels/sparse.py: pack).
A second one is ViP's interpolation back to full size in one pass
(virtual_upsample.cpp; leancnn/kernels/virtual_pool.py).

`psconv_extension()` builds leancnn/kernels/*.cpp against the
installed torch the first time it is needed (or at `make setup`), into a cache
under ~/.cache/leancnn (LEANCNN_CACHE overrides), and returns the module; when
no compiler is present it returns None and says so once, and callers fall back
to the masked dense convolution.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE_DIR = Path(__file__).resolve().parent
# The dispatch and Python entry points, then one translation unit per instruction set; the
# headers are part of the build id too.
COMPILED = ["psconv_kernel.cpp", "kernel_generic.cpp", "kernel_avx2.cpp", "kernel_avx512.cpp", "virtual_upsample.cpp",
            "aoti_shims.cpp"]
SOURCES = [SOURCE_DIR / name for name in COMPILED + ["kernel_common.h", "kernel_body.h", "kernel_ops.h"]]
# ATen's parallel_for is OpenMP in the header: without -fopenmp it runs on one thread.
BUILD_FLAGS = "-O3 -fopenmp"
_state: dict[str, object] = {}


def cache_root() -> Path:
    """Where leancnn keeps kernel builds and deploy plans: LEANCNN_CACHE, else ~/.cache/leancnn."""
    return Path(os.environ.get("LEANCNN_CACHE", Path.home() / ".cache" / "leancnn"))


def kernel_build_id() -> str:
    """One build per source text, flags and torch version: a changed kernel or torch rebuilds."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + BUILD_FLAGS.encode()
                          + torch.__version__.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """The build's directory: one per source text and flags (the build id) and per torch
    installation, since torch's build file names the installation's headers by path: two virtual
    environments sharing the cache would otherwise rebuild it in turn at every switch."""
    installation = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:6]
    return cache_root() / "kernels" / f"psconv-{kernel_build_id()}-{installation}"


def psconv_extension(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, or None (with one warning) when it cannot be built."""
    if "psconv" in _state:
        return _state["psconv"]  # type: ignore[return-value]
    if os.environ.get("LEANCNN_NO_KERNELS"):
        _state["psconv"] = None
        return None
    try:
        module = _load_built(verbose)
    except Exception as error:  # no compiler, no ninja, a failed build: run the masked dense path
        first_line = (str(error).strip().splitlines() or ["unknown error"])[-1]
        warnings.warn(f"leancnn: the compiled pSConv kernel is unavailable ({first_line}); "
                      "using the masked dense convolution", RuntimeWarning, stacklevel=2)
        module = None
    if module is not None:
        _register_operator_shapes()
    _state["psconv"] = module
    return module


def _load_built(verbose: bool = False) -> ModuleType:
    """Build (if needed) and load the kernel module from the cache, safely for many processes and
    checkouts at once.

    - The sources are compiled from a copy inside the build directory (its name is a hash of
      their text), not from this checkout: torch's build file names its sources by path, so two
      checkouts sharing the cache and a torch (a CI clone beside the working tree) rebuilt it in
      turn at every switch (60-70 s on 2 cores).
    - Builds are serialised by an advisory lock the system drops when its holder dies. torch's
      own lock is a file that a process killed mid-build leaves behind, and every later process
      then waited for it forever (seen: a server stopped during its first start's build); holding
      ours, any such file is stale and is removed."""
    from torch.utils.cpp_extension import load

    build = cache_dir()
    sources = build / "src"
    sources.mkdir(parents=True, exist_ok=True)
    with open(build / "leancnn-build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for path in SOURCES:
            target = sources / path.name
            if not target.exists():   # the same text by the directory's hash: an existing copy keeps its time
                with path.open("rb") as source, tempfile.NamedTemporaryFile(dir=sources, delete=False) as copy:
                    shutil.copyfileobj(source, copy)
                os.replace(copy.name, target)
        (build / "lock").unlink(missing_ok=True)
        return load(name="leancnn_psconv", sources=[str(sources / name) for name in COMPILED],
                    build_directory=str(build), extra_cflags=BUILD_FLAGS.split(), extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(sources)], verbose=verbose)


def kernel_library() -> Path | None:
    """The built kernel library (a shared object): `torch.ops.load_library` on it registers
    `torch.ops.leancnn.sparse_conv` and `torch.ops.leancnn.virtual_upsample` in a process that has
    torch and nothing of leancnn."""
    if psconv_extension() is None:
        return None
    found = sorted(cache_dir().glob("leancnn_psconv*.so"))
    return found[0] if found else None


def expose_operator_shims() -> Path | None:
    """Load the kernel library with RTLD_GLOBAL, so that an AOTInductor package compiled to call its
    C shims (aoti_shims.cpp) finds them; returns the library (None without a kernel). Loading it
    this way also registers the operators, as torch.ops.load_library does."""
    library = kernel_library()
    if library is not None and "shims" not in _state:
        _state["shims"] = ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    return library


def _register_operator_shapes() -> None:
    """The fake (shape-only) implementations of the operators, for torch.compile and torch.export:
    sparse_conv gives [N, C_out, ceil(H / stride), ceil(W / stride)], channels_last, like the kernel;
    virtual_upsample [N, C, height, width] in the values' memory format."""
    if "fake" in _state:
        return

    @torch.library.register_fake("leancnn::sparse_conv")
    def _sparse_conv_shape(input, weights, channels, taps, chunk_slot, chunk_group, segment_pair, bias, position,
                           stride, relu, residual, pass_blocks, serial):
        n, _, h, w = input.shape
        return torch.empty((n, position.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1), dtype=input.dtype,
                           device=input.device, memory_format=torch.channels_last)

    @torch.library.register_fake("leancnn::virtual_upsample")
    def _virtual_upsample_shape(values, height, width):
        n, c = values.shape[:2]
        last = values.is_contiguous(memory_format=torch.channels_last) and not values.is_contiguous()
        return torch.empty((n, c, height, width), dtype=values.dtype, device=values.device,
                           memory_format=torch.channels_last if last else torch.contiguous_format)

    _state["fake"] = True


def main() -> None:
    """`python -m leancnn.kernels`: build the kernels now (make setup does this)."""
    module = psconv_extension(verbose="-v" in sys.argv)
    if module is None:
        print("pSConv kernel: not built; leancnn will use the masked dense convolution")
        raise SystemExit(0)
    print(f"pSConv kernel: built in {cache_dir()}, instruction set {module.isa()}")


if __name__ == "__main__":
    main()
