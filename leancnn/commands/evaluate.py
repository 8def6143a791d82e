"""`leancnn eval RUN [--attack SPEC]...`: clean and robust accuracy, recorded in result.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data import load_dataset
from ..measure import parse_attack, robust_accuracy
from ..runs import read_json, save_result, load_run
from ..train import evaluate
from ..config import load_config


def run_eval(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    result = read_json(run_dir / "result.json")
    attacks = [parse_attack(spec, result["dataset"]) for spec in args.attack]  # fail before any work
    model, _ = load_run(run_dir)
    config = load_config(run_dir / "config.toml") if (run_dir / "config.toml").is_file() else None
    dataset = load_dataset(result["dataset"], args.data_dir or (config.data_dir if config else None))
    images, labels = dataset.test_images, dataset.test_labels
    subset = args.test_subset or (config.test_subset if config else None)
    if subset:
        dataset = dataset.subset(None, subset, seed=config.seed if config else 0)
        images, labels = dataset.test_images, dataset.test_labels
    clean = evaluate(model, images, labels, batch_size=args.batch_size)
    robust = dict(result.get("robust") or {})
    for attack in attacks:
        robust[attack.name] = robust_accuracy(model, images, labels, attack, batch_size=args.batch_size,
                                              progress=not args.no_progress)
    if attacks:
        result["robust"] = robust
        result.setdefault("robust_settings", {}).update({a.name: a.spec for a in attacks})
        save_result(run_dir, result)
    output = {"run_dir": str(run_dir), "test_images": len(labels), "test_acc": clean.top1,
              "test_top5": clean.top5, "robust": robust}
    if args.json:
        print(json.dumps(output, indent=2))
    else:
        print(f"{run_dir}: clean accuracy {100 * clean.top1:.2f}% on {len(labels)} test images")
        for name, value in robust.items():
            print(f"  under {result.get('robust_settings', {}).get(name, name)}: {100 * value:.2f}%")
    return 0
