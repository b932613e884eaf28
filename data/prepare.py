"""Data preparation: turn a text corpus into `train.bin`, `val.bin` and `meta.json` in nanoGPT's format.

Documents are split into train/val with the same call nanoGPT uses (`train_test_split(test_size=val_fraction,
seed=split_seed, shuffle=True)`), so OpenWebText gets nanoGPT's train/val documents. Each split is streamed
in batches of documents from the (disk-backed) dataset, tokenised on `num_proc` threads (tiktoken's batch
encoder releases the GIL) and appended to the output, so memory stays flat for billions of tokens and no
intermediate tokenised dataset is written.
Files are written under `.tmp` names, fsynced and renamed; `meta.json` is written last and is the commit
marker: without it the loader refuses the folder and a rerun starts over. A rerun with the same settings
(their fingerprint is in `meta.json`) does nothing; a rerun with different settings into a folder that holds
prepared data is a UserError rather than a silent rebuild, because a wrong `data.dir` must not overwrite hours
of work. Run as `python -m data.prepare data=<name> [data.key=value ...]`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from common.errors import UserError
from common.files import commit_file, write_atomic
from data import allocate, blocks
from data.prepare_command import prepare_command
from data.split_size import validation_warning
from data.tokenizers import Tokenizer, get_tokenizer, tokenizer_class

log = logging.getLogger("data.prepare")  # not __name__, which is "__main__" under `python -m`

FORMAT_VERSION = 1
DTYPE = np.dtype("<u2")  # little-endian uint16, nanoGPT's format
SAMPLES_DIR = Path(__file__).parent / "samples"
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SOURCES = ("hub", "files", "sample")
WRITE_BATCH_DOCS = 256  # documents read from the dataset at a time
TOKENIZE_BATCH_CHARS = 1 << 21  # text encoded at a time: its ids as Python ints take ~20× its size in memory
# Every key a `data` config may hold (the union over sources); anything else is a typo, refused at start-up.
CONFIG_KEYS = frozenset({
    "name", "source", "hf_path", "hf_revision", "hf_split", "files", "text_field", "tokenizer",
    "val_fraction", "split_seed", "num_proc", "cache_dir", "dir", "auto_prepare",
})


def unprepared_reason(data_cfg: Mapping[str, Any]) -> str | None:
    """Why the data folder cannot serve these settings, with the command that fixes it; None if it can."""
    out = Path(data_cfg["dir"])
    meta = read_meta(out)
    if meta is None:
        return (f"{out} holds no prepared data (no meta.json; a preparation may have been interrupted); "
                f"prepare it with: {prepare_command(data_cfg)}")
    settings = _settings(data_cfg)
    if meta.get("fingerprint") != _fingerprint(settings):
        other = f"{out}-{_fingerprint(settings)[:8]}"
        return (f"{out} holds data prepared with other settings ({_changed_settings(meta, settings)}); "
                f"set data.dir={other} and prepare it with: {prepare_command(data_cfg, other)}")
    damage = damaged_split(out, meta)
    return None if damage is None else f"{damage}; rebuild it with: {prepare_command(data_cfg)}"


def prepare(data_cfg: Mapping[str, Any]) -> Path:
    """Write the token files for `data_cfg` (or find them already written) and return their folder."""
    out = Path(data_cfg["dir"])
    settings = _settings(data_cfg)
    fingerprint = _fingerprint(settings)
    tokenizer = get_tokenizer(data_cfg["tokenizer"])
    if tokenizer.vocab_size > np.iinfo(DTYPE).max + 1:
        raise UserError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids; uint16 files hold 65536 at most"
        )

    meta = read_meta(out)
    if meta is not None:
        if meta.get("fingerprint") != fingerprint:
            raise UserError(
                f"{out} holds data prepared with other settings ({_changed_settings(meta, settings)}). "
                "Set data.dir to another folder, or delete this one to rebuild it"
            )
        damage = damaged_split(out, meta)
        if damage is None:
            log.info("%s is already prepared", out)
            return out
        log.warning("%s; rebuilding it", damage)
        (out / "meta.json").unlink()  # first, so an interrupted rebuild leaves a folder the loader refuses

    quiet = _quiet()
    if quiet:
        import datasets

        datasets.disable_progress_bars()
    out.mkdir(parents=True, exist_ok=True)
    documents = _load_documents(data_cfg)
    splits = _split(documents, settings["val_fraction"], settings["split_seed"])
    with allocate.removed_on_failure([out / f"{name}.bin.tmp" for name in splits]):
        counts = {
            name: _write_split(split, out / f"{name}.bin", tokenizer, data_cfg["num_proc"], quiet)
            for name, split in splits.items()
        }
    meta = {
        **settings,
        "fingerprint": fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": "uint16",
        "splits": counts,
        "blocks": blocks.record(out, list(counts)),  # for the content check at every training start
    }
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    log.info(
        "wrote %s: %s",
        out,
        ", ".join(f"{k} {v['tokens']:,} tokens / {v['documents']:,} docs" for k, v in counts.items()),
    )
    return out


def check_names(cfg: Mapping[str, Any]) -> None:
    """The data config's names (source, tokenizer) exist: checked at start-up, before any data work."""
    if cfg["source"] not in SOURCES:
        raise UserError(f"unknown data.source {cfg['source']!r}; choose one of: {', '.join(SOURCES)}")
    tokenizer_class(cfg["tokenizer"])


def _settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that determines the files' content; its hash is the fingerprint in meta.json."""
    check_names(cfg)
    if cfg["source"] == "hub":
        source = {
            "kind": "hub",
            "hf_path": cfg["hf_path"],
            "hf_revision": cfg["hf_revision"],
            "hf_split": cfg["hf_split"],
        }
    elif cfg["source"] == "files":
        paths = _resolve_files(cfg["files"])
        stats = "\n".join(f"{p}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in paths)
        source = {
            "kind": "files",
            "files": _patterns(cfg["files"]),
            "num_files": len(paths),
            "files_digest": hashlib.sha256(stats.encode()).hexdigest(),
        }
    else:
        path = _sample_path(cfg["files"])
        source = {
            "kind": "sample",
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    source["text_field"] = cfg["text_field"]
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": cfg["tokenizer"],
        "source": source,
        "val_fraction": float(cfg["val_fraction"]),
        "split_seed": int(cfg["split_seed"]),
    }


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _patterns(files: Any) -> list[str]:
    if files is None:
        raise UserError("data.files is not set: give a glob or a list, e.g. data.files='corpus/*.txt'")
    return [files] if isinstance(files, str) else [str(f) for f in files]


def _resolve_files(files: Any) -> list[Path]:
    """Expand globs (relative to the working directory) into a sorted list of absolute paths."""
    patterns = _patterns(files)
    paths = sorted(
        {
            Path(p).resolve()
            for pattern in patterns
            for p in glob.glob(os.path.expanduser(pattern), recursive=True)
        }
    )
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise UserError(f"data.files={patterns} matches no files (globs are relative to {Path.cwd()})")
    unsupported = sorted({p.suffix for p in paths} - set(BUILDERS))
    if unsupported:
        raise UserError(
            f"data.files includes unsupported file types {unsupported}; use {', '.join(BUILDERS)}"
        )
    return paths


def _sample_path(name: str) -> Path:
    path = SAMPLES_DIR / name
    if not path.is_file():
        shipped = ", ".join(p.name for p in sorted(SAMPLES_DIR.glob("*.jsonl*")))
        raise UserError(f"no shipped sample {name!r}; the package has: {shipped}")
    return path


def _load_documents(cfg: Mapping[str, Any]):  # -> datasets.Dataset with one column "text"
    """The source as a dataset of documents; `datasets` is imported late so users' HF_*_OFFLINE apply."""
    import datasets

    if cfg["source"] == "sample":
        path = _sample_path(cfg["files"])
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            return datasets.Dataset.from_dict({"text": [json.loads(line)[cfg["text_field"]] for line in f]})
    if cfg["source"] == "hub":
        try:
            table = datasets.load_dataset(
                cfg["hf_path"],
                revision=cfg["hf_revision"],
                split=cfg["hf_split"],
                cache_dir=cfg.get("cache_dir"),
                num_proc=cfg["num_proc"],
            )
        except Exception as err:  # network, offline mode, unknown repo or revision: all fixable by the user
            raise UserError(
                f"cannot load {cfg['hf_path']} (revision {cfg['hf_revision']}) from the Hugging Face Hub: "
                f"{type(err).__name__}: {err}. Check the internet connection and that HF_DATASETS_OFFLINE/"
                "HF_HUB_OFFLINE are unset (or the dataset is already in the cache)"
            ) from err
        return _text_column(table, cfg["text_field"], cfg["hf_path"])
    by_builder: dict[str, list[str]] = {}
    for path in _resolve_files(cfg["files"]):
        by_builder.setdefault(BUILDERS[path.suffix], []).append(str(path))
    parts = []
    for builder, paths in by_builder.items():
        extra = {"sample_by": "document"} if builder == "text" else {}
        table = datasets.load_dataset(
            builder, data_files=paths, split="train", cache_dir=cfg.get("cache_dir"), **extra
        )
        parts.append(
            _text_column(table, "text" if builder == "text" else cfg["text_field"], f"{builder} files")
        )
    return datasets.concatenate_datasets(parts)


def _text_column(table, field: str, what: str):
    if field not in table.column_names:
        raise UserError(f"{what} have no field {field!r} (fields: {table.column_names}); set data.text_field")
    table = table.select_columns([field])
    return table.rename_column(field, "text") if field != "text" else table


def _split(documents, val_fraction: float, split_seed: int) -> dict[str, Any]:
    """Split by documents exactly as nanoGPT does, so the val set is a fixed set of whole documents."""
    n = len(documents)
    if not 0 < val_fraction < 1 or not 1 <= math.ceil(val_fraction * n) < n:
        raise UserError(
            f"data.val_fraction={val_fraction} with {n} documents leaves no train or no val document"
        )
    parts = documents.train_test_split(test_size=val_fraction, seed=split_seed, shuffle=True)
    return {"train": parts["train"], "val": parts["test"]}


def _token_batches(split, tokenizer: Tokenizer, threads: int) -> Iterator[np.ndarray]:
    """The split's documents in order, as uint16 arrays of consecutive documents' ids, each followed by the
    EOT id. Documents are encoded ~`TOKENIZE_BATCH_CHARS` of text at a time (a longer document alone), so
    memory stays bounded whatever the documents' sizes."""
    for batch in split.iter(batch_size=WRITE_BATCH_DOCS):
        texts = batch["text"]
        start = 0
        while start < len(texts):
            end, size = start + 1, len(texts[start])
            while end < len(texts) and size + len(texts[end]) <= TOKENIZE_BATCH_CHARS:
                size += len(texts[end])
                end += 1
            documents = tokenizer.encode_batch(texts[start:end], num_threads=threads)
            lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
            ids = np.fromiter(itertools.chain.from_iterable(documents), dtype=DTYPE, count=int(lengths.sum()))
            yield np.insert(ids, np.cumsum(lengths), tokenizer.eot_id)
            start = end


def _write_split(split, path: Path, tokenizer: Tokenizer, num_proc: int, quiet: bool) -> dict[str, int]:
    """Tokenise one split and append it batch by batch to a temporary file, renamed to `path` when complete;
    return its counts. Memory holds one batch of documents; tokenisation runs on `num_proc` threads."""
    tmp = path.with_name(path.name + ".tmp")
    # Regular writes report a full disk as an error (a memmap would die of SIGBUS), so the exact size need
    # not be known first: the headroom is checked up front, and a disk that fills up later is a UserError.
    allocate.reserve(tmp, 0)
    total = 0
    try:
        with open(tmp, "wb") as out, tqdm(unit="tok", unit_scale=True, desc=f"writing {path.name}",
                                          disable=quiet) as bar:
            for ids in _token_batches(split, tokenizer, num_proc):
                out.write(ids.tobytes())
                total += len(ids)
                bar.update(len(ids))
    except OSError as e:
        raise UserError(f"cannot write {tmp} ({e.strerror}); free space or set data.dir to a larger disk"
                        ) from None
    commit_file(tmp, path)
    return {"tokens": total, "documents": len(split)}


def read_meta(out: Path) -> dict[str, Any] | None:
    """The folder's meta.json, None if it has none; a damaged one is a UserError naming what is wrong."""
    path = out / "meta.json"
    if not path.is_file():
        return None
    fix = f"delete {out} and prepare the data again"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a JSON {type(meta).__name__}, not an object; {fix}")
    splits = meta.get("splits")
    if not (isinstance(splits, dict) and {"train", "val"} <= splits.keys()
            and all(isinstance(c, dict) and isinstance(c.get("tokens"), int) for c in splits.values())):
        raise UserError(f"{path} has no valid 'splits' (token counts of train and val); {fix}")
    for key, kind in (("vocab_size", int), ("eot_id", int), ("tokenizer", str), ("dtype", str)):
        if not isinstance(meta.get(key), kind):
            raise UserError(f"{path} has no valid {key!r}; {fix}")
    return meta


def _changed_settings(meta: dict[str, Any], settings: dict[str, Any]) -> str:
    return "; ".join(
        f"{key}: {json.dumps(meta.get(key))} on disk, {json.dumps(settings[key])} requested"
        for key in settings
        if meta.get(key) != settings[key]
    )


def damaged_split(out: Path, meta: dict[str, Any]) -> str | None:
    """None when every token file has the size meta.json promises, else which one does not (the one
    truncated-file check: preparation and the loader both use it)."""
    for name, counts in meta["splits"].items():
        path = out / f"{name}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != counts["tokens"] * DTYPE.itemsize:
            return (f"{path} has {size} bytes but meta.json promises {counts['tokens']} tokens = "
                    f"{counts['tokens'] * DTYPE.itemsize} bytes (truncated or replaced)")
    return None


def _quiet() -> bool:
    """Progress bars are for people: off under CI and when stderr is not a terminal."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false") or not sys.stderr.isatty()


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="prepare")
def main(cfg: DictConfig) -> None:
    handler = logging.StreamHandler()  # only ours: a root handler would print `datasets` warnings twice
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        warning = validation_warning(read_meta(prepare(cfg.data)))
    except UserError as err:  # Hydra would print a traceback for anything raised out of here
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if warning is not None:
        log.warning("warning: %s", warning)


if __name__ == "__main__":
    main()
