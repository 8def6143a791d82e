"""The benchmarks' doc splicing: each machine keeps its own section under a marker, so a run on
one CPU replaces that CPU's figures and never another's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import machine_sections, spliced  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

ZEN5 = "machine: AMD EPYC (Zen 5, family 26 model 2), 2 cores, torch 2.13.0+cpu, python 3.11.7, threads 1"
XEON = "machine: Intel(R) Xeon(R) Processor (family 6 model 167), 2 cores, torch 2.13.0+cpu, python 3.11.7, threads 1"
PAGE = "# Title\n\nprose\n\n<!-- t:start -->\n{}\n<!-- t:end -->\n\nmore prose\n"


def test_a_second_machine_gets_its_own_section_and_a_rerun_replaces_only_its_own():
    legacy = PAGE.format(f"{ZEN5}\n\n| a |\n| 1 |")          # written before sections existed
    both = spliced(legacy, f"{XEON}\n\n| a |\n| 2 |", "t")
    assert both.startswith("# Title\n\nprose\n") and both.endswith("more prose\n")
    region = both.split("<!-- t:start -->")[1].split("<!-- t:end -->")[0]
    assert machine_sections(region) == {"AMD EPYC (Zen 5, family 26 model 2)": f"{ZEN5}\n\n| a |\n| 1 |",
                                        "Intel(R) Xeon(R) Processor (family 6 model 167)": f"{XEON}\n\n| a |\n| 2 |"}
    again = spliced(both, f"{ZEN5}\n\n| a |\n| 3 |", "t")
    region = again.split("<!-- t:start -->")[1].split("<!-- t:end -->")[0]
    assert list(machine_sections(region).values()) == [f"{ZEN5}\n\n| a |\n| 3 |", f"{XEON}\n\n| a |\n| 2 |"]
    assert spliced(again, f"{ZEN5}\n\n| a |\n| 3 |", "t") == again   # idempotent


def test_a_placeholder_is_dropped_and_a_block_must_name_its_machine():
    placeholder = PAGE.format("(not measured yet: run the benchmark)")
    text = spliced(placeholder, f"{XEON}\n\n| a |", "t")
    assert "not measured yet" not in text
    assert f"<!-- machine: Intel(R) Xeon(R) Processor (family 6 model 167) -->\n{XEON}" in text
    assert spliced(placeholder, f"{XEON}\n", "other") is None
    with pytest.raises(ValueError, match="must name its machine"):
        spliced(placeholder, "| a table with no machine line |", "t")
