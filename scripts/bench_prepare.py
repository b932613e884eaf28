"""Benchmark data preparation against raw tiktoken on the same documents and cores, in one process run.

The corpus is local text files (`--files`), or one this script writes: documents of 20-200 paragraphs drawn
(seeded) from the shipped Shakespeare sample, in several .jsonl files, until `--tokens` GPT-2 tokens. Raw
tiktoken is `encode_ordinary_batch(documents, num_threads=--threads)` over the documents already in memory, in
groups of ~2M characters as the pipeline encodes them; the pipeline is `data.prepare.prepare` with `data=text`
and `num_proc=--threads` into a fresh folder. They alternate `--reps` times; the ratio is the median of raw
time / pipeline time per repetition, for the tokenise-and-write phase (the steady state: `_write_split` of
both splits) and end to end (also reading the files into the datasets cache and splitting). Memory: the
anonymous resident set (Linux; mapped cache files excluded) sampled every 0.1 s while the splits are written,
as growth over its value when writing starts.

    python scripts/bench_prepare.py [--tokens 30000000] [--threads 2] [--reps 3] [--out bench_prepare.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import tiktoken
from bench_optim import machine
from omegaconf import OmegaConf

import data.prepare as prep

SAMPLE = Path(prep.SAMPLES_DIR) / "shakespeare.jsonl"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "text.yaml"


def make_corpus(folder: Path, tokens: int, encoding: tiktoken.Encoding, files: int = 8, seed: int = 0
                ) -> None:
    """Documents of random runs of the sample's paragraphs, spread over `files` .jsonl files."""
    paragraphs = [p for line in SAMPLE.read_text().splitlines()
                  for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    probe = "\n\n".join(paragraphs[:2000])
    chars_per_token = len(probe) / len(encoding.encode_ordinary(probe))
    rng, written, index = random.Random(seed), 0, 0
    outputs = [open(folder / f"part{i:02d}.jsonl", "w") for i in range(files)]
    try:
        while written < tokens * chars_per_token:
            start = rng.randrange(len(paragraphs))
            text = "\n\n".join(paragraphs[start:start + rng.randint(20, 200)])
            outputs[index % files].write(json.dumps({"text": text}) + "\n")
            written, index = written + len(text), index + 1
    finally:
        for f in outputs:
            f.close()


def read_documents(paths: list[str]) -> list[str]:
    documents = []
    for path in paths:
        with open(path) as f:
            documents += [json.loads(line)["text"] for line in f] if path.endswith(".jsonl") else [f.read()]
    return documents


def raw_tiktoken(encoding: tiktoken.Encoding, documents: list[str], threads: int) -> tuple[float, int]:
    """Seconds and tokens of `encode_ordinary_batch` over the documents, in the same groups of about
    `TOKENIZE_BATCH_CHARS` characters as the pipeline (its best batch size: a group of 1,024 long documents
    creates millions of Python ints at once, which measured slower)."""
    groups, group, size = [], [], 0
    for document in documents:
        if group and size + len(document) > prep.TOKENIZE_BATCH_CHARS:
            groups.append(group)
            group, size = [], 0
        group.append(document)
        size += len(document)
    groups.append(group)
    start, count = time.perf_counter(), 0
    for group in groups:
        count += sum(map(len, encoding.encode_ordinary_batch(group, num_threads=threads)))
    return time.perf_counter() - start, count


def resident_bytes() -> int:
    """Anonymous resident memory (Linux): the process's own allocations, without the pages of memory-mapped
    files (the datasets cache), which the kernel can drop at any time."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class WriteTimer:
    """Wraps `data.prepare._write_split`: its total seconds, and the resident set while it runs."""

    def __init__(self) -> None:
        self.seconds, self.rss_start, self.rss_peak = 0.0, None, 0
        self._original = prep._write_split

    def __call__(self, *args: Any) -> dict[str, int]:
        done = threading.Event()
        if self.rss_start is None:
            self.rss_start = resident_bytes()

        def sample() -> None:
            while not done.wait(0.1):
                self.rss_peak = max(self.rss_peak, resident_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            return self._original(*args)
        finally:
            self.seconds += time.perf_counter() - start
            done.set()
            sampler.join()


def run_pipeline(files: list[str], out: Path, threads: int, cache: Path) -> dict[str, Any]:
    cfg = OmegaConf.load(CONFIG)
    cfg.files, cfg.dir, cfg.cache_dir = files, str(out), str(cache)
    cfg.num_proc, cfg.val_fraction = threads, 0.01
    timer = WriteTimer()
    prep._write_split = timer
    try:
        start = time.perf_counter()
        prep.prepare(OmegaConf.to_container(cfg, resolve=True))
        total = time.perf_counter() - start
    finally:
        prep._write_split = timer._original
    meta = json.loads((out / "meta.json").read_text())
    return {"end_to_end_s": total, "write_s": timer.seconds,
            "tokens": sum(s["tokens"] for s in meta["splits"].values()),
            "documents": sum(s["documents"] for s in meta["splits"].values()),
            "rss_growth_mb": (timer.rss_peak - timer.rss_start) / 2**20 if timer.rss_start else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default=None, help="a glob of .txt/.jsonl files (default: make a corpus)")
    parser.add_argument("--tokens", type=int, default=30_000_000, help="size of the corpus made")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="bench_prepare.json")
    args = parser.parse_args()
    os.environ.setdefault("CI", "true")  # no progress bars
    encoding = tiktoken.get_encoding("r50k_base")
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        if args.files is None:
            corpus = work_dir / "corpus"
            corpus.mkdir()
            make_corpus(corpus, args.tokens, encoding)
            pattern = str(corpus / "*.jsonl")
        else:
            pattern = args.files
        files = sorted(glob.glob(pattern))
        if not files:
            sys.exit(f"error: --files {pattern} matches no files")
        documents = read_documents(files)
        load = os.getloadavg()
        raw_runs, pipeline_runs = [], []
        for rep in range(args.reps):
            raw_runs.append(raw_tiktoken(encoding, documents, args.threads))
            pipeline_runs.append(run_pipeline(files, work_dir / f"out{rep}", args.threads, work_dir / "hf"))
            r, p = raw_runs[-1], pipeline_runs[-1]
            print(f"rep {rep}: raw {r[1] / r[0] / 1e6:.2f} M tok/s; pipeline write "
                  f"{r[1] / p['write_s'] / 1e6:.2f} M tok/s, end to end {r[1] / p['end_to_end_s'] / 1e6:.2f} "
                  f"M tok/s, RSS growth while writing {p['rss_growth_mb']:.0f} MB", flush=True)
    tokens = raw_runs[0][1]
    result = {
        "machine": machine(), "command": " ".join(sys.argv), "threads": args.threads,
        "load_average": {"before": load, "after": os.getloadavg()},
        "documents": len(documents), "tokens": tokens, "text_mb": sum(map(len, documents)) / 2**20,
        "raw_tok_per_s": [count / seconds for seconds, count in raw_runs],
        "pipeline": pipeline_runs,
        "ratio_write_vs_raw": statistics.median(r[0] / p["write_s"]
                                                for r, p in zip(raw_runs, pipeline_runs, strict=True)),
        "ratio_end_to_end_vs_raw": statistics.median(r[0] / p["end_to_end_s"]
                                                     for r, p in zip(raw_runs, pipeline_runs, strict=True)),
    }
    print(f"{tokens:,} tokens in {len(documents):,} documents ({result['text_mb']:.0f} MB), {args.threads} "
          f"threads: pipeline / raw tiktoken = {result['ratio_write_vs_raw']:.2f} (tokenise and write), "
          f"{result['ratio_end_to_end_vs_raw']:.2f} (end to end)")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
