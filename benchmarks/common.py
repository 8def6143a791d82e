"""Helpers every benchmark uses: pinned threads, the machine's description, medians."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leancnn.kernels import cache_root, psconv_extension  # noqa: E402
from leancnn.evaluate import run_test_split  # noqa: E402
from leancnn.measure.attacks import parse_attack  # noqa: E402
from leancnn.measure.latency import cpu_model, fastest_format_latency  # noqa: E402
from leancnn.measure.robustness import robust_accuracies  # noqa: E402
from leancnn.runs import load_run, read_result  # noqa: E402


# (C_in, C_out, input size, stride): every distinct 3x3 layer of resnet18 at 32x32.
RESNET18_LAYERS = [(64, 64, 32, 1), (64, 128, 32, 2), (128, 128, 16, 1), (128, 256, 16, 2), (256, 256, 8, 1),
                   (256, 512, 8, 2), (512, 512, 4, 1)]


def paired_seconds(fns: list, runs: int, warmup_seconds: float = 0.3) -> list[float]:
    """Median seconds of each function, timed in alternating rounds (one call of each per round):
    when the host takes CPU time from this VM, it slows the compared calls alike."""
    with torch.no_grad():
        started = time.perf_counter()
        while time.perf_counter() - started < warmup_seconds:
            for fn in fns:
                fn()
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(runs):
            for fn, spent in zip(fns, times):
                t = time.perf_counter()
                fn()
                spent.append(time.perf_counter() - t)
    return [median(spent) for spent in times]


def pin_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def kernel_machine_line(threads: int = 1) -> str:
    """The machine line, the kernel's instruction set and the measured FMA peak on `threads` threads."""
    extension = psconv_extension()
    isa = extension.isa() if extension is not None else "avx2"
    return (f"{machine_line()}; kernel ISA {isa if extension is not None else 'none (not built)'}, "
            f"measured FMA peak {fma_peak_gflops(isa, threads):.0f} GFLOP/s ({threads} thread(s))")


def machine_line() -> str:
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"python {platform.python_version()}, threads {torch.get_num_threads()}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


MACHINE_SECTION = re.compile(r"<!-- machine: (.*?) -->\n")
MACHINE_OF_BLOCK = re.compile(r"machine: (.*?), \d+ cores")


def machine_sections(region: str) -> dict[str, str]:
    """The per-machine blocks between a marker's start and end, by the CPU they were measured on.
    A region written before machines had sections is one block, keyed by its machine line (a
    placeholder with no machine line is dropped)."""
    parts = MACHINE_SECTION.split(region)
    if len(parts) == 1:
        found = MACHINE_OF_BLOCK.search(region)
        return {found.group(1): region.strip()} if found else {}
    return {key: text.strip() for key, text in zip(parts[1::2], parts[2::2])}


def spliced(text: str, block: str, marker: str) -> str | None:
    """`text` with `block` as its machine's section between <!-- marker:start --> and
    <!-- marker:end --> (the other machines' sections kept, in their order); None without the marker."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    pattern = re.compile(re.escape(start) + "(.*?)" + re.escape(end), re.S)
    region = pattern.search(text)
    if region is None:
        return None
    found = MACHINE_OF_BLOCK.search(block)
    if found is None:
        raise ValueError(f"a published block must name its machine (machine_line()); {marker}'s does not")
    sections = machine_sections(region.group(1))
    sections[found.group(1)] = block.strip()
    body = "\n\n".join(f"<!-- machine: {key} -->\n{value}" for key, value in sections.items())
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text, count=1)


def splice_doc(block: str, marker: str, document: str) -> None:
    """Put `block` into `document`, a page under docs/ (benchmarks never edit the README: it quotes
    a few figures by hand, with their command), as the section of the machine it names: figures
    from one machine never overwrite another's (spliced)."""
    if not document.startswith("docs/"):
        raise ValueError(f"benchmarks write their figures into docs/, not {document}")
    path = Path(__file__).resolve().parents[1] / document
    text = spliced(path.read_text(), block, marker)
    if text is None:
        print(f"{document} has no <!-- {marker}:start --> marker; table not spliced")
        return
    path.write_text(text)


def best_latency_ms(model, input_shape, batch: int, threads: int, runs: int) -> float:
    """Median latency in ms, the faster of the two memory formats."""
    return fastest_format_latency(model, input_shape, batch_size=batch, threads=threads, runs=runs).median_ms


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def publish(name: str, block: str, data, document: str, marker: str | None = None) -> None:
    """benchmarks/results/NAME.md (the block) and NAME.json (the data); splice the block
    into `document` between <!-- marker:start/end --> (marker defaults to NAME with '-')."""
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.md").write_text(block + "\n")
    write_json(results / f"{name}.json", data)
    splice_doc(block, marker or name.replace("_", "-"), document)


@torch.no_grad()
def with_batch_norm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """An untrained model's batch norms given non-trivial running statistics (in place), so that
    folding them is not the identity; time does not depend on the values."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def print_and_publish(name: str, header: str, how: str, table: str, rows, quick: bool, document: str) -> None:
    """The block a benchmark ends with (machine line, the command and how it timed, the table),
    printed, and unless `quick` published (publish) into `document`."""
    block = f"{header}\n\n`.venv/bin/python benchmarks/{name}.py` ({how})\n\n{table}"
    print(block)
    if not quick:
        publish(name, block, rows, document)


def fma_peak_gflops(isa: str, threads: int, seconds: float = 0.5) -> float:
    """The measured FMA peak (GFLOP/s) of `isa` ("avx512" or "avx2", as the kernel reports it)
    on `threads` threads: benchmarks/fma_peak.cpp, built once into leancnn's cache."""
    source = Path(__file__).resolve().parent / "fma_peak.cpp"
    build = cache_root() / "kernels" / f"fma-peak-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}"
    build.mkdir(parents=True, exist_ok=True)
    module = load(name="leancnn_fma_peak", sources=[str(source)], build_directory=str(build),
                  extra_cflags=["-O2", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return module.peak_gflops(isa, threads, seconds)


def worst_case_figures(run_dir: Path, eps: float, images: int, *, steps: int = 50, targets: int = 3,
                       queries: int = 1000, log_to=print) -> dict[str, float]:
    """PGD-10 and AutoAttack (and each of its components) on the same `images` test images of a
    run, at Linf `eps`: {"pgd": , "autoattack": , "autoattack/apgd-ce": , ...}. Cached in the run's
    worst_case.json under the settings, because AutoAttack on a CPU takes minutes per model."""
    specs = [f"pgd:eps={eps},steps=10", f"autoattack:eps={eps},steps={steps},targets={targets},queries={queries}"]
    key = f"{images} images: " + " + ".join(specs)
    cache_path = Path(run_dir) / "worst_case.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if key in cache:
        return cache[key]
    model, _ = load_run(run_dir)
    dataset = run_test_split(Path(run_dir), read_result(run_dir), None, images)
    figures: dict[str, float] = {}
    for spec in specs:
        started = time.perf_counter()
        figures.update(robust_accuracies(model, dataset.test_images, dataset.test_labels, parse_attack(spec),
                                         progress=False))
        log_to(f"    {spec}: {time.perf_counter() - started:.0f} s")
    cache[key] = figures
    write_json(cache_path, cache)
    return figures
