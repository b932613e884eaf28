"""Find numbers in README.md and docs/ that no longer match what their commands print.

    python scripts/check_docs_numbers.py                                # the docs against the results file
    python scripts/check_docs_numbers.py --run runs/quickstart/adamw    # and the results file against a run

docs/results/quickstart.json holds the quick start's numbers, each with the command that printed it. Every
quote of them in the docs (the QUOTES below: a file and a pattern whose groups are the quoted numbers) must
equal the file's value rounded as the quote is; a quote that is no longer found is reported too, so that
rewording a sentence cannot retire its check unnoticed. With --run, the run's final val_loss and eval_loss's
output on it (re-measured now) must equal the file's to 1e-4: a change that moves the quick start shows up
here, and the file and the docs are then updated together. Exit status 1 lists every stale number.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "quickstart.json"
NUMBER = r"(\d+\.\d+)"
# (file, pattern, the results file's key for each group of the pattern)
QUOTES = [
    ("README.md", rf"Validation loss:\s+{NUMBER} at step 0 → {NUMBER} at step 300",
     ("val_loss_step0", "val_loss")),
    ("docs/evaluation.md", rf"whose last record is `val_loss`\s+{NUMBER} at step 300", ("val_loss",)),
    ("docs/evaluation.md", rf"prints `val loss {NUMBER}\s+perplexity\s+{NUMBER}",
     ("eval_loss", "perplexity")),
]


def stale_quotes(results: dict) -> list[str]:
    problems = []
    for name, pattern, keys in QUOTES:
        matches = list(re.finditer(pattern, (REPO / name).read_text()))
        if not matches:
            problems.append(f"{name}: no longer quotes /{pattern}/; update the quote or QUOTES")
        for match in matches:
            for quoted, key in zip(match.groups(), keys, strict=True):
                decimals = len(quoted.split(".")[1])
                if f"{results[key]['value']:.{decimals}f}" != quoted:
                    problems.append(f"{name}: quotes {key} = {quoted}, but {results[key]['command']} gives "
                                    f"{results[key]['value']:.{decimals}f}")
    return problems


def stale_results(results: dict, run: Path) -> list[str]:
    """The results file against `run`, re-measured: its metrics and eval_loss on its final checkpoint."""
    from gpt.cli.eval_loss import main as eval_loss
    from gpt.metrics import read_metrics

    records = [r for r in read_metrics(run / "metrics.jsonl") if r.get("val_loss") is not None]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "eval_loss.json"
        eval_loss([str(run), "--json", str(out)])
        measured = json.loads(out.read_text())
    now = {"val_loss_step0": records[0]["val_loss"], "val_loss": records[-1]["val_loss"],
           "eval_loss": measured["loss"], "perplexity": math.exp(measured["loss"])}
    return [f"{RESULTS.name}: {key} = {results[key]['value']:.4f}, but {run} gives {value:.4f} now"
            for key, value in now.items() if abs(value - results[key]["value"]) > 1e-4 * max(1, value)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished quick-start run to re-measure the results with")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text())
    problems = stale_quotes(results) + (stale_results(results, args.run) if args.run else [])
    for problem in problems:
        print(f"stale: {problem}")
    print(f"{len(problems)} stale number(s)" if problems else "the quoted numbers match")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
