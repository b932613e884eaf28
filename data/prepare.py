"""Data preparation: turn a text corpus into `train.bin`, `val.bin` and `meta.json` in nanoGPT's format.

Map-style sources (local files, the shipped sample, a Hub dataset) are split into train/val by whole documents
with the permutation of nanoGPT's call (`train_test_split(test_size=val_fraction, seed=split_seed,
shuffle=True)`), so OpenWebText gets nanoGPT's train/val documents. A `stream` source (a Hub dataset read with
`streaming=True`: the Pile, FineWeb-Edu) takes its validation documents from a split of its own or from the
start of the stream, and may stop the training split at a token budget. Either way each split's documents are
read in order, tokenised on `num_proc` threads and appended to the output (`data/token_writer.py`), so memory
stays flat for billions of tokens and no intermediate tokenised dataset is written. Token files are `uint16`,
or `uint32` for a vocabulary beyond 65,536 ids.

Before any work the data folder is checked (a folder, writable, below an existing parent) and so is the
corpus (`data/sources.py`). Files are written under `.tmp` names, fsynced and renamed; `meta.json` is written
last and is the commit marker: without it the loader refuses the folder and a rerun starts over. A rerun with
the same settings (their fingerprint is in `meta.json`) does nothing; a rerun with different settings into a
folder that holds prepared data is a UserError rather than a silent rebuild, because a wrong `data.dir` must
not overwrite hours of work. Run as `python -m data.prepare data=<name> [data.key=value ...]`.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from common.errors import UserError
from common.files import write_atomic
from data import blocks, sources
from data.prepare_command import prepare_command
from data.split_size import validation_warning
from data.token_writer import Encoded, SplitFile, encode
from data.tokenizers import HFTokenizer, Tokenizer, get_tokenizer, tokenizer_class

log = logging.getLogger("data.prepare")  # not __name__, which is "__main__" under `python -m`

FORMAT_VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian; uint16 is nanoGPT's format
SAMPLES_DIR = Path(__file__).parent / "samples"
SOURCES = ("hub", "files", "sample", "stream")
WRITE_BATCH_DOCS = 256  # documents read from the source at a time
# Every key a `data` config may hold (the union over sources); anything else is a typo, refused at start-up.
CONFIG_KEYS = frozenset({
    "name", "source", "hf_path", "hf_name", "hf_revision", "hf_split", "hf_val_split", "files", "text_field",
    "tokenizer", "val_fraction", "split_seed", "val_tokens", "train_tokens", "num_proc", "cache_dir", "dir",
    "auto_prepare",
})


def token_dtype(vocab_size: int) -> str:
    """The narrowest dtype of DTYPES that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def unprepared_reason(data_cfg: Mapping[str, Any]) -> str | None:
    """Why the data folder cannot serve these settings, with the command that fixes it; None if it can."""
    out = Path(data_cfg["dir"])
    _check_location(out)
    if not out.exists():
        return f"data folder {out} does not exist: prepare it with: {prepare_command(data_cfg)}"
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
    _check_location(out)
    paths = _resolve_files(data_cfg["files"]) if data_cfg["source"] == "files" else None  # once, not per use
    settings = _settings(data_cfg, paths)
    fingerprint = _fingerprint(settings)
    tokenizer = get_tokenizer(data_cfg["tokenizer"])

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
        _make_writable(out)
        (out / "meta.json").unlink()  # first, so an interrupted rebuild leaves a folder the loader refuses

    _make_writable(out)
    dtype = token_dtype(tokenizer.vocab_size)
    pinned: dict[str, str] = {}
    if data_cfg["source"] == "stream":
        pinned = _hub_commit(data_cfg)  # read at one commit, even if the branch moves on meanwhile
        counts = _write_stream({**data_cfg, "hf_revision": pinned.get("hf_commit", data_cfg["hf_revision"])},
                               out, tokenizer, DTYPES[dtype])
    else:
        documents = _load_documents(data_cfg, paths)
        splits = sources.split_indices(len(documents), settings["val_fraction"], settings["split_seed"])
        counts = {name: _write_split(_batches(documents, indices), out / f"{name}.bin", tokenizer,
                                     data_cfg["num_proc"], DTYPES[dtype])
                  for name, indices in splits.items()}
    meta = {
        **settings,
        "fingerprint": fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype,
        "splits": counts,
        "blocks": blocks.record(out, list(counts)),  # for the content checks of every run
        **pinned,
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


def _settings(cfg: Mapping[str, Any], paths: list[Path] | None = None) -> dict[str, Any]:
    """Everything that determines the files' content; its hash is the fingerprint in meta.json. `paths`: the
    resolved `data.files`, when the caller has them."""
    check_names(cfg)
    if cfg["source"] == "hub":
        source = {
            "kind": "hub",
            "hf_path": cfg["hf_path"],
            "hf_revision": cfg["hf_revision"],
            "hf_split": cfg["hf_split"],
        }
    elif cfg["source"] == "stream":
        source = {"kind": "stream", **{key: cfg.get(key) for key in (
            "hf_path", "hf_name", "hf_revision", "hf_split", "hf_val_split", "val_tokens", "train_tokens")}}
        _check_stream(cfg)
    elif cfg["source"] == "files":
        paths = _resolve_files(cfg["files"]) if paths is None else paths
        stats = "\n".join(f"{p}\t{st.st_size}\t{st.st_mtime_ns}" for p in paths for st in [p.stat()])
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
    streamed = cfg["source"] == "stream"
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer": cfg["tokenizer"],
        "source": source,
        "val_fraction": None if streamed else float(cfg["val_fraction"]),
        "split_seed": None if streamed else int(cfg["split_seed"]),
    }
    if tokenizer_class(cfg["tokenizer"]) is HFTokenizer:  # built-in tokenizers are fixed by their name
        settings["tokenizer_sha256"] = get_tokenizer(cfg["tokenizer"]).files_sha256
    return settings


def _check_stream(cfg: Mapping[str, Any]) -> None:
    for key in ("val_fraction", "split_seed"):
        if cfg.get(key) is not None:
            raise UserError(f"data.{key} does not apply to a stream source (it holds out the first "
                            "data.val_tokens tokens, or reads data.hf_val_split); set it to null")
    if not cfg.get("hf_val_split") and not cfg.get("val_tokens"):
        raise UserError("a stream source needs a validation split: set data.hf_val_split to one of the "
                        "dataset's splits, or data.val_tokens to hold out the first documents of the stream")
    for key in ("val_tokens", "train_tokens"):
        if cfg.get(key) is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise UserError(f"data.{key}={cfg[key]!r} must be a positive number of tokens or null")


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _patterns(files: Any) -> list[str]:
    if files is None:
        raise UserError("data.files is not set: give a glob or a list, e.g. data.files='corpus/*.txt'")
    return [files] if isinstance(files, str) else [str(f) for f in files]


def _resolve_files(files: Any) -> list[Path]:
    """Expand globs (relative to the working directory) into a sorted list of absolute paths without symbolic
    links (`Path.resolve()`'s, in `Path` order: the order fixes which documents are validation)."""
    patterns = _patterns(files)
    folders: dict[str, str] = {}

    def resolved(path: str) -> str:  # os.path.realpath, with each folder resolved once rather than per file
        folder, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.islink(path):
            return os.path.realpath(path)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder or ".")
        return os.path.join(folders[folder], name)

    found = {resolved(p) for pattern in patterns
             for p in glob.glob(os.path.expanduser(pattern), recursive=True)}
    paths = [Path(p) for p in sorted(found, key=lambda p: p.split(os.sep)) if os.path.isfile(p)]
    if not paths:
        raise UserError(f"data.files={patterns} matches no files (globs are relative to {Path.cwd()})")
    unsupported = sorted({p.suffix for p in paths} - set(sources.BUILDERS))
    if unsupported:
        raise UserError(
            f"data.files includes unsupported file types {unsupported}; use {', '.join(sources.BUILDERS)}"
        )
    return paths


def _sample_path(name: str) -> Path:
    path = SAMPLES_DIR / name
    if not path.is_file():
        shipped = ", ".join(p.name for p in sorted(SAMPLES_DIR.glob("*.jsonl*")))
        raise UserError(f"no shipped sample {name!r}; the package has: {shipped}")
    return path


def _check_location(out: Path) -> None:
    """`data.dir` can be a data folder: not a file, and not below a missing folder outside the working
    directory (a typo, or a disk that is not mounted, would otherwise receive hours of work; the default
    `data_cache/...` under the working directory is created)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"data.dir {out} is a file, not a folder; set data.dir to a folder (new or prepared)")
    path = Path(os.path.abspath(out))
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"data.dir {out} is below {existing}, a file; set data.dir to a folder")
    missing_parent = existing not in (path, path.parent)
    if missing_parent and not path.is_relative_to(Path.cwd()):
        raise UserError(f"data.dir {out} is below {path.parent}, which does not exist (a typo, or a disk "
                        f"that is not mounted?); create it first (mkdir -p {path.parent}) or set data.dir to "
                        "a folder whose parent exists")


def _make_writable(out: Path) -> None:
    """Create `out` and check that files can be written in it, before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write into data.dir {out} ({e.strerror}); set data.dir to a folder you can "
                        "write") from None


def _load_documents(cfg: Mapping[str, Any], paths: list[Path] | None = None) -> sources.Documents:
    if cfg["source"] == "sample":
        return sources.sample_documents(_sample_path(cfg["files"]), cfg["text_field"])
    if cfg["source"] == "hub":
        return sources.hub_documents(cfg)
    paths = _resolve_files(cfg["files"]) if paths is None else paths
    return sources.file_documents(paths, cfg["text_field"], cfg.get("cache_dir"))


def _batches(documents: sources.Documents, indices: np.ndarray) -> Iterator[list[str]]:
    for start in range(0, len(indices), WRITE_BATCH_DOCS):
        yield documents.texts(indices[start : start + WRITE_BATCH_DOCS])


def _write_split(batches: Iterator[list[str]], path: Path, tokenizer: Tokenizer, threads: int,
                 dtype: np.dtype) -> dict[str, int]:
    """Tokenise one split's documents into `path`; its token and document counts."""
    split = SplitFile(path, sources.quiet())
    try:
        for encoded in encode(batches, tokenizer, threads, dtype):
            split.add(encoded)
    except BaseException:
        split.discard()
        raise
    return split.commit()


def _write_stream(cfg: Mapping[str, Any], out: Path, tokenizer: Tokenizer, dtype: np.dtype
                  ) -> dict[str, dict[str, int]]:
    """Both splits of a stream source: val from `hf_val_split` or the stream's first `val_tokens` tokens of
    whole documents, train from the (rest of the) stream up to `train_tokens`."""
    quiet, threads = sources.quiet(), cfg["num_proc"]

    def stream(split: str) -> Iterator[Encoded]:
        return encode(sources.iter_stream(cfg, split, WRITE_BATCH_DOCS), tokenizer, threads, dtype)

    files: dict[str, SplitFile] = {}
    try:
        for name in ("train", "val"):
            files[name] = SplitFile(out / f"{name}.bin", quiet)
        if cfg.get("hf_val_split"):
            _fill(files["val"], stream(cfg["hf_val_split"]), cfg.get("val_tokens"))
            rest: Iterator[Encoded] = stream(cfg["hf_split"])
        else:
            train_stream = stream(cfg["hf_split"])
            left = _fill(files["val"], train_stream, cfg["val_tokens"])
            rest = itertools.chain([left] if left is not None else [], train_stream)
        _fill(files["train"], rest, cfg.get("train_tokens"))
        for name, split in files.items():
            if split.documents == 0:
                total = files["val"].tokens + files["train"].tokens
                raise UserError(f"the {name} split of {cfg['hf_path']} came out empty (the stream has "
                                f"{total:,} tokens); lower data.val_tokens")
        return {name: split.commit() for name, split in files.items()}
    except BaseException:
        for split in files.values():
            split.discard()
        raise


def _fill(split: SplitFile, stream: Iterator[Encoded], budget: int | None) -> Encoded | None:
    """Append `stream` to `split` until it holds `budget` tokens (whole documents; all of it for None);
    return what is left of the batch that crossed the budget."""
    for encoded in stream:
        if budget is None:
            split.add(encoded)
            continue
        taken = encoded.documents_to_reach(budget - split.tokens)
        split.add(encoded.head(taken))
        if split.tokens >= budget:
            return encoded.tail(taken) if taken < len(encoded.ends) else None
    return None


def _hub_commit(cfg: Mapping[str, Any]) -> dict[str, str]:
    """`{"hf_commit": sha}` of the Hub dataset's `hf_revision` now; empty when the Hub cannot say (offline, a
    local folder): the stream then reads `hf_revision` as given."""
    try:
        from huggingface_hub import HfApi

        return {"hf_commit": HfApi().dataset_info(cfg["hf_path"], revision=cfg["hf_revision"]).sha}
    except Exception:  # offline or a local path: the record is informative only
        return {}


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
    if meta["dtype"] not in DTYPES:
        raise UserError(f"{path} has dtype {meta['dtype']!r}; token files are {' or '.join(DTYPES)}: {fix}")
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
    itemsize = DTYPES[meta["dtype"]].itemsize
    for name, counts in meta["splits"].items():
        path = out / f"{name}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != counts["tokens"] * itemsize:
            return (f"{path} has {size} bytes but meta.json promises {counts['tokens']} tokens = "
                    f"{counts['tokens'] * itemsize} bytes (truncated or replaced)")
    return None


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
