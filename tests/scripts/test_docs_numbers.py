"""scripts/check_docs_numbers.py: the quick start's numbers quoted in README.md and docs/ equal the committed
results file, and a stale quote or a stale results file is reported."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
check = importlib.import_module("check_docs_numbers")


def test_the_docs_quote_the_results_file():
    """Wrong if a doc quotes a quick-start number other than docs/results/quickstart.json's (re-measured by
    the commands it names), or no longer quotes one the checker looks for."""
    assert check.stale_quotes(json.loads(check.RESULTS.read_text())) == []


def test_a_changed_number_is_reported():
    """Wrong if the checker passes docs whose numbers differ from the results (it would check nothing)."""
    results = json.loads(check.RESULTS.read_text())
    for key in (key for key in results if not key.startswith("_")):  # "_measured": where and how
        moved = {**results, key: {**results[key], "value": results[key]["value"] + 0.01}}
        problems = check.stale_quotes(moved)
        assert problems and all(key in problem for problem in problems), key
