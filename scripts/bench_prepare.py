"""Benchmark data preparation against raw tiktoken on the same documents and cores.

The corpus is local files (`--files GLOB`), or one this script writes from the shipped Shakespeare sample
(seeded), until `--tokens` GPT-2 tokens: `--corpus jsonl` (documents of 20-200 paragraphs in 8 .jsonl files)
or `--corpus txt` (`--file-count` small .txt files of 1-80 paragraphs each, like a folder of documentation
sources). Each repetition measures, alternating the two:

- steady state, in this process: raw tiktoken (`encode_ordinary_batch(documents, num_threads=--threads)` over
  the documents already in memory, in groups of ~2M characters) against the pipeline's tokenise-and-write
  phase (`data.prepare._write_split` of both splits, inside `data.prepare.prepare`);
- end to end, as a user runs it (process start, imports, reading the files, the datasets cache for record
  files, splitting, hashing the blocks, fsync): `python -c <read, encode, write uint16>` against
  `python -m data.prepare data=text data.files=... data.num_proc=--threads` into a fresh folder and cache.

Ratios are raw time / pipeline time (median over repetitions; 1.0 = as fast as raw tiktoken). `--cpus 0,1`
pins the benchmark and its child processes to those cores. `--hash-rate` instead measures SHA-256 over 16 MiB
blocks (the token-file verification of data/blocks.py) and extrapolates to OpenWebText's train split.

    python scripts/bench_prepare.py [--corpus jsonl|txt | --files GLOB] [--tokens 30000000] [--threads 2]
        [--reps 3] [--cpus 0,1] [--out bench_prepare.json]
    python scripts/bench_prepare.py --hash-rate [--out bench_hash.json]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import statistics
import subprocess
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
from data import blocks

REPO = Path(__file__).resolve().parents[1]
SAMPLE = prep.SAMPLES_DIR / "shakespeare.jsonl"
CONFIG = REPO / "configs" / "data" / "text.yaml"
GROUP_CHARS = 1 << 21  # raw tiktoken's groups: its best batch (1,024 long documents at once were slower)
OPENWEBTEXT_TRAIN_BYTES = 9_035_582_198 * 2  # nanoGPT's train.bin: 9.04B uint16 tokens

# Raw tiktoken as a process of its own: read the files, encode them in groups, write the ids as uint16.
RAW_SCRIPT = """
import itertools, json, sys, numpy, tiktoken
paths, out = [p for p in open(sys.argv[1]).read().splitlines() if p], sys.argv[2]
threads, group_chars = int(sys.argv[3]), int(sys.argv[4])
encoding = tiktoken.get_encoding("r50k_base")
def documents():
    for path in paths:
        with open(path, encoding="utf-8") as f:
            yield from ([json.loads(line)["text"] for line in f] if path.endswith(".jsonl") else [f.read()])
with open(out, "wb") as f:
    group, size, count = [], 0, 0
    for document in itertools.chain(documents(), [None]):
        if group and (document is None or size + len(document) > group_chars):
            ids = encoding.encode_ordinary_batch(group, num_threads=threads)
            tokens = numpy.fromiter(itertools.chain.from_iterable(ids), dtype=numpy.uint16)
            f.write(tokens.tobytes())
            count += len(tokens)
            group, size = [], 0
        if document is not None:
            group.append(document)
            size += len(document)
print(count)
"""


def paragraphs() -> list[str]:
    return [p for line in SAMPLE.read_text().splitlines() for p in json.loads(line)["text"].split("\n\n")
            if p.strip()]


def make_jsonl_corpus(folder: Path, characters: int, seed: int = 0, files: int = 8) -> None:
    """Documents of random runs of 20-200 of the sample's paragraphs, spread over `files` .jsonl files."""
    texts, rng, written, index = paragraphs(), random.Random(seed), 0, 0
    outputs = [open(folder / f"part{i:02d}.jsonl", "w") for i in range(files)]
    try:
        while written < characters:
            start = rng.randrange(len(texts))
            text = "\n\n".join(texts[start:start + rng.randint(20, 200)])
            outputs[index % files].write(json.dumps({"text": text}) + "\n")
            written, index = written + len(text), index + 1
    finally:
        for f in outputs:
            f.close()


def make_txt_corpus(folder: Path, characters: int, count: int, seed: int = 0) -> None:
    """`count` .txt files in a few subfolders, sizes drawn so that they hold about `characters` in total."""
    texts, rng = paragraphs(), random.Random(seed)
    mean_paragraphs = max(1, round(characters / count / (sum(map(len, texts)) / len(texts))))
    for i in range(count):
        start = rng.randrange(len(texts))
        path = folder / f"section{i % 16:02d}" / f"page{i:05d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n\n".join(texts[start:start + rng.randint(1, 2 * mean_paragraphs)]) + "\n",
                        encoding="utf-8")


def read_documents(paths: list[str]) -> list[str]:
    documents = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            documents += [json.loads(line)["text"] for line in f] if path.endswith(".jsonl") else [f.read()]
    return documents


def raw_steady(encoding: tiktoken.Encoding, documents: list[str], threads: int) -> tuple[float, int]:
    """Seconds and tokens of `encode_ordinary_batch` over the documents in groups of ~GROUP_CHARS."""
    groups, group, size = [], [], 0
    for document in documents:
        if group and size + len(document) > GROUP_CHARS:
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
    """Anonymous resident memory (Linux): the process's own allocations, without memory-mapped files."""
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


def pipeline_steady(files: list[str], out: Path, threads: int, cache: Path) -> dict[str, Any]:
    cfg = OmegaConf.load(CONFIG)
    cfg.files, cfg.dir, cfg.cache_dir = files, str(out), str(cache)
    cfg.num_proc, cfg.val_fraction = threads, 0.01
    timer = WriteTimer()
    prep._write_split = timer
    try:
        prep.prepare(OmegaConf.to_container(cfg, resolve=True))
    finally:
        prep._write_split = timer._original
    meta = json.loads((out / "meta.json").read_text())
    return {"write_s": timer.seconds, "tokens": sum(s["tokens"] for s in meta["splits"].values()),
            "rss_growth_mb": (timer.rss_peak - timer.rss_start) / 2**20 if timer.rss_start else None}


def timed_process(command: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"error: {' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def raw_end_to_end(files: list[str], work: Path, threads: int) -> tuple[float, int]:
    (work / "files.txt").write_text("\n".join(files))
    seconds, stdout = timed_process([sys.executable, "-c", RAW_SCRIPT, str(work / "files.txt"),
                                     str(work / "raw.bin"), str(threads), str(GROUP_CHARS)])
    (work / "raw.bin").unlink()
    return seconds, int(stdout.split()[-1])


def pipeline_end_to_end(pattern: str, out: Path, threads: int, cache: Path) -> tuple[float, int]:
    seconds, _ = timed_process([sys.executable, "-m", "data.prepare", "data=text", f"data.files={pattern}",
                                f"data.dir={out}", f"data.cache_dir={cache}", f"data.num_proc={threads}",
                                "data.val_fraction=0.01"])
    meta = json.loads((out / "meta.json").read_text())
    return seconds, sum(s["tokens"] for s in meta["splits"].values())


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    encoding = tiktoken.get_encoding("r50k_base")
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        if args.files is None:
            corpus = work_dir / "corpus"
            corpus.mkdir()
            probe = "\n\n".join(paragraphs()[:2000])
            characters = int(args.tokens * len(probe) / len(encoding.encode_ordinary(probe)))
            if args.corpus == "txt":
                make_txt_corpus(corpus, characters, args.file_count)
            else:
                make_jsonl_corpus(corpus, characters)
            pattern = str(corpus / "**" / f"*.{args.corpus}")
        else:
            pattern = os.path.abspath(args.files)
        files = sorted(glob.glob(pattern, recursive=True))
        if not files:
            sys.exit(f"error: --files {pattern} matches no files")
        documents = read_documents(files)
        load = os.getloadavg()
        runs = []
        for rep in range(args.reps):
            rep_dir = work_dir / f"rep{rep}"
            rep_dir.mkdir()
            raw_s, tokens = raw_steady(encoding, documents, args.threads)
            steady = pipeline_steady(files, rep_dir / "steady", args.threads, rep_dir / "hf_steady")
            raw_e2e_s, raw_tokens = raw_end_to_end(files, rep_dir, args.threads)
            e2e_s, e2e_tokens = pipeline_end_to_end(pattern, rep_dir / "e2e", args.threads,
                                                    rep_dir / "hf_e2e")
            assert tokens + len(documents) == steady["tokens"] == e2e_tokens and raw_tokens == tokens, \
                "the pipeline wrote another number of tokens than raw tiktoken encoded (+ one EOT a document)"
            runs.append({"raw_steady_s": raw_s, "pipeline_write_s": steady["write_s"],
                         "raw_end_to_end_s": raw_e2e_s, "pipeline_end_to_end_s": e2e_s,
                         "rss_growth_mb": steady["rss_growth_mb"]})
            print(f"rep {rep}: steady state raw {tokens / raw_s / 1e6:.2f} vs pipeline "
                  f"{tokens / steady['write_s'] / 1e6:.2f} M tok/s; end to end raw {raw_e2e_s:.1f} s vs "
                  f"pipeline {e2e_s:.1f} s", flush=True)
    result = {
        "machine": machine(), "command": " ".join(sys.argv), "threads": args.threads,
        "cpus": sorted(os.sched_getaffinity(0)),
        "load_average": {"before": load, "after": os.getloadavg()},
        "files": len(files), "documents": len(documents), "tokens": tokens,
        "text_mb": sum(map(len, documents)) / 2**20, "runs": runs,
        "ratio_steady_state": statistics.median(r["raw_steady_s"] / r["pipeline_write_s"] for r in runs),
        "ratio_end_to_end": statistics.median(r["raw_end_to_end_s"] / r["pipeline_end_to_end_s"]
                                              for r in runs),
    }
    print(f"{tokens:,} tokens in {len(files):,} files, {len(documents):,} documents "
          f"({result['text_mb']:.0f} MB), {args.threads} threads: pipeline / raw tiktoken = "
          f"{result['ratio_steady_state']:.2f} (steady state: tokenise and write), "
          f"{result['ratio_end_to_end']:.2f} (end to end, process start included)")
    return result


def hash_rate(args: argparse.Namespace) -> dict[str, Any]:
    """SHA-256 over 16 MiB blocks in memory, on 1 thread and on 1 + VERIFY_THREADS threads (the batch's
    thread and the background walk): MB/s of wall time and per CPU-second."""
    block = os.urandom(blocks.BLOCK_BYTES)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv),
                              "load_average": os.getloadavg(), "block_bytes": blocks.BLOCK_BYTES}
    for threads in (1, 1 + blocks.VERIFY_THREADS):
        count = 32 * threads

        def work(n: int) -> None:
            for _ in range(n):
                hashlib.sha256(block).digest()

        workers = [threading.Thread(target=work, args=(count // threads,)) for _ in range(threads)]
        wall, cpu = time.perf_counter(), time.process_time()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        megabytes = count * blocks.BLOCK_BYTES / 1e6
        result[f"{threads}_threads"] = {
            "wall_mb_per_s": megabytes / wall, "mb_per_cpu_s": megabytes / cpu,
            "openwebtext_train_wall_s": OPENWEBTEXT_TRAIN_BYTES / 1e6 / (megabytes / wall),
            "openwebtext_train_cpu_s": OPENWEBTEXT_TRAIN_BYTES / 1e6 / (megabytes / cpu)}
        print(f"{threads} thread(s): {megabytes / wall:,.0f} MB/s wall, {megabytes / cpu:,.0f} MB per "
              "CPU-second: "
              f"OpenWebText's train split ({OPENWEBTEXT_TRAIN_BYTES / 1e9:.1f} GB) in "
              f"{OPENWEBTEXT_TRAIN_BYTES / 1e6 / (megabytes / wall):.0f} s wall, "
              f"{OPENWEBTEXT_TRAIN_BYTES / 1e6 / (megabytes / cpu):.0f} CPU-seconds", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default=None, help="a glob of .txt/.jsonl files (default: make a corpus)")
    parser.add_argument("--corpus", choices=("jsonl", "txt"), default="jsonl", help="the corpus to make")
    parser.add_argument("--tokens", type=int, default=30_000_000, help="size of the corpus made")
    parser.add_argument("--file-count", type=int, default=5000, help="files of the txt corpus made")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cpus", default=None, help="pin to these cores, e.g. 0,1 (children inherit it)")
    parser.add_argument("--hash-rate", action="store_true", help="measure block hashing instead")
    parser.add_argument("--out", default="bench_prepare.json")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    os.environ.setdefault("CI", "true")  # no progress bars
    result = hash_rate(args) if args.hash_rate else benchmark(args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
