"""DNR on Fashion-MNIST against the two baselines the issue names, at one
training budget: dense adversarial training (`dnr:density=1,prune_fraction=0`,
the same hybrid loss and attack, no pruning), and magnitude pruning of that
dense model to the same density followed by adversarial fine-tuning
(`magprune`). DNR irregular at density 0.05 (20x) and DNR channel mode at a
density that halves the MACs. Clean, FGSM and PGD accuracy (eps 0.1, PGD with
--eval-steps iterations at evaluation), parameters, effective MACs, storage
with index cost, training wall time, the channel model's measured CPU
speed-up, and a plot of each layer's density over the epochs.

The model is vgg11 at width 0.25 (a VGG chain: every channel is removable,
and adversarial training with PGD fits a CPU); training uses PGD with
--train-steps iterations. Finished runs are skipped on a second start.

    nohup .venv/bin/python benchmarks/dnr_table.py --threads 1 > dnr.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import best_latency_ms, log, machine_line, pin_threads, publish, worst_case_figures

from leancnn.evaluate import attack_run
from leancnn.compress import compress_run
from leancnn.config import TrainConfig
from leancnn.deploy import deploy
from leancnn.experiment import ensure_run
from leancnn.runs import load_run

ROOT = Path(__file__).resolve().parents[1]


def train(args, name: str, spec: str) -> Path:
    out = Path(args.out) / name
    config = TrainConfig(data="fashion-mnist", model=args.model, width=args.width, epochs=args.epochs,
                         train_subset=args.train_subset, seed=args.seed, threads=args.threads, latency=False,
                         methods=[spec], out=str(out), lr=args.lr, batch_size=128).validate()
    log(f"{name}: {spec} ...")
    result = ensure_run(config, progress=False)
    log(f"    clean {result.test_acc:.4f}, {result.train_seconds:.0f} s of training")
    return out


def plot_densities(run_dir: Path, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    layers = list(entries[0]["dnr_density"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for layer in layers:
        ax.plot([e["epoch"] for e in entries], [100 * e["dnr_density"][layer] for e in entries], marker="o",
                label=layer)
    ax.set_xlabel("epoch")
    ax.set_ylabel("density (% of weights kept)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--finetune", type=int, default=2, help="adversarial fine-tuning epochs of magprune")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--channel-density", type=float, default=0.7,
                        help="with --channel-multiple 8: 49.7%% of vgg11 w0.25's MACs")
    parser.add_argument("--channel-multiple", type=int, default=8, help="channel counts kept in multiples of this")
    parser.add_argument("--latency-rounds", type=int, default=7,
                        help="latency: rounds taking turns between the models; the median round counts")
    parser.add_argument("--train-steps", type=int, default=3, help="PGD iterations while training")
    parser.add_argument("--eval-steps", type=int, default=10, help="PGD iterations at evaluation")
    parser.add_argument("--attack-subset", type=int, default=2000,
                        help="test images attacked (the first N of the test set; clean accuracy uses all 10k)")
    parser.add_argument("--worst-case-images", type=int, default=500,
                        help="test images PGD-10 and AutoAttack are both run on for the worst-case columns "
                             "(AutoAttack: 50 APGD steps, 3 APGD-T targets, 1000 Square queries); 0 = skip")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--latency-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="run directory (default benchmarks/out/dnr, or dnr-wWIDTH "
                                                    "for a width other than 0.25)")
    args = parser.parse_args()
    # Results and the docs table per width: dnr_table (0.25) or dnr_table_w0.5 (marker dnr-table-w0.5).
    suffix = "" if args.width == 0.25 else f"-w{args.width:g}"
    args.out = args.out or str(ROOT / "benchmarks" / "out" / f"dnr{suffix}")
    pin_threads(args.threads)
    attack = f"attack=pgd,eps={args.eps},steps={args.train_steps}"
    runs = {
        "dense adversarial": train(args, "dense-adv", f"dnr:density=1,prune_fraction=0,{attack}"),
        f"DNR irregular (density {args.density})": train(args, "dnr-irregular", f"dnr:density={args.density},{attack}"),
        f"DNR channel (density {args.channel_density}, multiples of {args.channel_multiple})": train(
            args, "dnr-channel", f"dnr:density={args.channel_density},mode=channel,"
                                 f"round_to={args.channel_multiple},{attack}"),
    }
    magprune = Path(args.out) / "magprune"
    if not (magprune / "result.json").is_file():
        log(f"magprune:density={args.density}, {args.finetune} epochs of adversarial fine-tuning ...")
        compress_run(runs["dense adversarial"], [f"magprune:density={args.density},{attack}"], epochs=args.finetune,
                     out=magprune, progress=False, latency=False)
    runs[f"magnitude pruning + adversarial fine-tuning (density {args.density})"] = magprune
    specs = ["fgsm:eps=%g" % args.eps, f"pgd:eps={args.eps},steps={args.eval_steps}"]
    rows = []
    for label, run_dir in runs.items():
        result = json.loads((run_dir / "result.json").read_text())
        if not all(name in (result.get("robust") or {}) for name in ("fgsm", "pgd")):
            log(f"attacking {label} ...")
            attack_run(run_dir, specs, test_subset=args.attack_subset, progress=False)
            result = json.loads((run_dir / "result.json").read_text())
        rows.append({"label": label, "run_dir": str(run_dir), **{k: result[k] for k in (
            "test_acc", "params_total", "params_nonzero", "macs_dense", "macs_effective", "storage_bytes",
            "train_seconds")}, "fgsm": result["robust"]["fgsm"], "pgd": result["robust"]["pgd"],
                     "finetune_epochs": result.get("compress", {}).get("finetune_epochs")})
        if args.worst_case_images:
            log(f"worst case of {label} on {args.worst_case_images} images ...")
            rows[-1]["worst_case"] = worst_case_figures(run_dir, args.eps, args.worst_case_images, log_to=log)
    pin_threads(args.latency_threads)
    # Rounds taking turns between the models, the median per model: on this VM one measurement of a
    # 10 ms model moved by 20% from one minute to the next, which a single pass per model turns into
    # a 20% error in the speed-up.
    # Deployed: batch norm folded, pruned layers on their measured plans (the sparse kernel where it
    # is faster), made once per model and reused by every round.
    models = [(deploy(model), architecture) for model, architecture in map(load_run, [r["run_dir"] for r in rows])]
    samples = [[] for _ in rows]
    for _ in range(args.latency_rounds):
        for times, (model, architecture) in zip(samples, models):
            times.append(best_latency_ms(model, tuple(architecture["input_shape"]), 64, args.latency_threads, 20))
    for row, times in zip(rows, samples):
        row["latency_b64"] = statistics.median(times)
    dense = rows[0]
    worst = bool(args.worst_case_images)
    lines = ["| model | clean | FGSM | PGD-%d |%s params non-zero | MACs effective | storage (with index) | "
             "training (s) | latency b64 (ms) | speed-up b64 |" % (
                 args.eval_steps, " PGD-10 / worst case (gap) |" if worst else ""),
             "| --- | ---: | ---: | ---: |%s ---: | ---: | ---: | ---: | ---: | ---: |" % (" ---: |" if worst else "")]
    for r in rows:
        training = f"{r['train_seconds']:.0f}" + (f" + {r['finetune_epochs']} ep. fine-tune" if r["finetune_epochs"] else "")
        gap = ""
        if worst:
            w = r["worst_case"]
            gap = (f" {100 * w['pgd']:.1f}% / {100 * w['autoattack']:.1f}% "
                   f"({100 * (w['autoattack'] - w['pgd']):+.1f}) |")
        lines.append(f"| {r['label']} | {100 * r['test_acc']:.2f}% | {100 * r['fgsm']:.2f}% | {100 * r['pgd']:.2f}% |{gap} "
                     f"{r['params_nonzero'] / 1e3:.1f} k | {r['macs_effective'] / 1e6:.2f} M | "
                     f"{r['storage_bytes'] / 2**10:.0f} KiB | {training} | {r['latency_b64']:.1f} | "
                     f"{dense['latency_b64'] / r['latency_b64']:.2f}x |")
    plot = ROOT / "docs" / f"dnr_density{suffix}.png"
    plot_densities(runs[f"DNR irregular (density {args.density})"], plot,
                   f"DNR {args.model} w{args.width}: per-layer density over the epochs")
    summary = (f"{machine_line()}\n\n{args.model} (width {args.width}) on a {args.train_subset}-image subset of "
               f"Fashion-MNIST, {args.epochs} epochs, batch 128, SGD+Nesterov, one-cycle lr {args.lr}, seed "
               f"{args.seed}; every run trains on beta = 0.5 clean + 0.5 PGD-{args.train_steps} (eps {args.eps}) "
               f"loss. Clean accuracy on the full 10k test set; FGSM and PGD-{args.eval_steps} at eps {args.eps} on "
               f"{args.attack_subset} test images. "
               + (f"Worst case: PGD-10 and AutoAttack (APGD-CE, APGD-T, Square: 50 APGD steps, 3 APGD-T targets, "
                  f"1000 Square queries; the worst case per image) on the same {args.worst_case_images} test "
                  f"images; the gap is worst case minus PGD-10, in points. " if worst else "") +
               f"Latency: batch 64, {args.latency_threads} thread(s), deployed (batch norm folded, pruned layers on "
               f"their measured plans: the sparse kernel where it is faster), the faster memory format, "
               f"median of 20 runs, then the median of {args.latency_rounds} rounds taking turns between the models. "
               f"Training "
               f"wall time at {args.threads} thread(s); the dense baseline is `dnr:density=1` (no masks: plain "
               f"adversarial training with the same loss and attack).")
    block = f"{summary}\n\n" + "\n".join(lines) + f"\n\n![DNR densities](../dnr_density{suffix}.png)"
    print(block)
    publish(f"dnr_table{suffix.replace('-', '_')}", block, rows, "docs/methods/dnr.md", marker=f"dnr-table{suffix}")


if __name__ == "__main__":
    main()
