"""The documents of a data source, read for preparation, and the checks that refuse a malformed corpus.

Map-style sources (`files`, `sample`, `hub`) give a `Documents`: a length and the texts at given indices, so
preparation can split them with nanoGPT's call and read each split in its shuffled order. `.txt` files are
read directly, one document per file, without the `datasets` library: no Arrow cache and no per-file dataset
work, which dominated the preparation of corpora of many small files. Every `.txt` file is decoded once before
any tokenising, so a binary or non-UTF-8 file is one error naming it rather than a failure halfway. Record
files (`.jsonl`/`.json`/`.parquet`) and Hub datasets go through `datasets` (its Arrow cache gives random
access to corpora larger than memory); when it fails, or a record lacks the text field, the files are scanned
one by one to name the file, line and fix. A `stream` source (`iter_stream`) reads a Hub dataset with
`streaming=True`: documents in the dataset's order, nothing cached.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import UserError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class Documents(Protocol):
    """A map-style corpus: `len()` documents, read by index."""

    def __len__(self) -> int: ...

    def texts(self, indices: Sequence[int]) -> list[str]:
        """The documents at `indices`, in that order."""
        ...


class InMemory:
    def __init__(self, texts: list[str]) -> None:
        self._texts = texts

    def __len__(self) -> int:
        return len(self._texts)

    def texts(self, indices: Sequence[int]) -> list[str]:
        return [self._texts[i] for i in indices]


class TextFiles:
    """One document per `.txt` file: its UTF-8 text with universal newlines (as `datasets`' text builder
    reads a file with `sample_by="document"`, so the token files are the ones it gave)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        for path in paths:  # before any tokenising: a bad file is refused up front, not hours later
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): a binary "
                    "file? Remove it from data.files or convert it to UTF-8") from None
            except OSError as e:
                raise UserError(f"cannot read {path} ({e.strerror}); fix its permissions or remove it from "
                                "data.files") from None

    def __len__(self) -> int:
        return len(self.paths)

    def texts(self, indices: Sequence[int]) -> list[str]:
        texts = []
        for i in indices:
            with open(self.paths[i], encoding="utf-8") as f:
                texts.append(f.read())
        return texts


class ArrowDocuments:
    """A `datasets.Dataset` with one column `text` (disk-backed: memory holds the rows asked for)."""

    def __init__(self, dataset: Any) -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def texts(self, indices: Sequence[int]) -> list[str]:
        return self._dataset[np.asarray(indices, dtype=np.int64)]["text"]


class Concatenated:
    """Several corpora as one, indexed in order (the first's documents, then the second's, ...)."""

    def __init__(self, parts: list[Documents]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def texts(self, indices: Sequence[int]) -> list[str]:
        indices = np.asarray(indices, dtype=np.int64)
        part_of = np.searchsorted(self.starts, indices, side="right") - 1
        texts: list[str] = [""] * len(indices)
        for p in np.unique(part_of):
            where = np.flatnonzero(part_of == p)
            part_texts = self.parts[p].texts(indices[where] - self.starts[p])
            for position, text in zip(where, part_texts, strict=True):
                texts[position] = text
        return texts


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The document indices of each split, in reading order: nanoGPT's `train_test_split(test_size=
    val_fraction, seed=seed, shuffle=True)` of `datasets` (a PCG64 permutation; its first ceil(f·n) are
    val)."""
    n_val = int(np.ceil(val_fraction * n))
    if not 0 < val_fraction < 1 or not 1 <= n_val < n:
        raise UserError(f"data.val_fraction={val_fraction} with {n} documents leaves no train or no val "
                        "document")
    permutation = np.random.default_rng(seed).permutation(n)
    return {"train": permutation[n_val:], "val": permutation[:n_val]}


def sample_documents(path: Path, field: str) -> Documents:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        return InMemory([json.loads(line)[field] for line in f])


def file_documents(paths: list[Path], field: str, cache_dir: str | None) -> Documents:
    """Local files as one corpus: grouped by kind in the order the kinds first appear among `paths` (sorted),
    each group's files in order; `.txt` read directly, record files through `datasets`."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(BUILDERS[path.suffix], []).append(path)
    parts = [TextFiles(group) if builder == "text" else _record_files(builder, group, field, cache_dir)
             for builder, group in groups.items()]
    return parts[0] if len(parts) == 1 else Concatenated(parts)


def hub_documents(cfg: Mapping[str, Any]) -> Documents:
    datasets = _datasets()
    try:
        table = datasets.load_dataset(cfg["hf_path"], revision=cfg["hf_revision"], split=cfg["hf_split"],
                                      cache_dir=cfg.get("cache_dir"), num_proc=cfg["num_proc"])
    except Exception as err:  # network, offline mode, unknown repo or revision: all fixable by the user
        raise UserError(
            f"cannot load {cfg['hf_path']} (revision {cfg['hf_revision']}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {err}. Check the internet connection and that HF_DATASETS_OFFLINE/"
            "HF_HUB_OFFLINE are unset (or the dataset is already in the cache)"
        ) from err
    return ArrowDocuments(_text_column(table, cfg["text_field"], cfg["hf_path"]))


def iter_stream(cfg: Mapping[str, Any], split: str, batch: int) -> Iterator[list[str]]:
    """The texts of a Hub dataset's split, `batch` documents at a time, streamed in the dataset's order."""
    datasets = _datasets()
    what = f"{cfg['hf_path']} ({cfg.get('hf_name') or 'default'} config, {split} split)"
    field, read = cfg["text_field"], 0
    try:
        stream = datasets.load_dataset(cfg["hf_path"], name=cfg.get("hf_name"), split=split,
                                       revision=cfg["hf_revision"], streaming=True)
        if field in (stream.column_names or ()):  # Parquet shards then decode only that column
            stream = stream.select_columns([field])
        for rows in stream.iter(batch_size=batch):
            texts = rows.get(field)
            if texts is None:
                raise UserError(f"{what} has no field {field!r} (fields: {sorted(rows)}); set "
                                "data.text_field")
            if not all(isinstance(t, str) for t in texts):
                bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
                raise UserError(f"{what} document {read + bad} has no text in {field!r} "
                                f"({type(texts[bad]).__name__}); set data.text_field")
            read += len(texts)
            yield texts
    except UserError:
        raise
    except Exception as err:  # network, offline mode, unknown repo, config or split: fixable by the user
        raise UserError(
            f"cannot stream {what} from the Hugging Face Hub after {read:,} documents ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the names, the internet connection and "
            "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE, then rerun (the preparation starts over)") from None


def quiet() -> bool:
    """Progress bars are for people: off under CI and when stderr is not a terminal."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false") or not sys.stderr.isatty()


def _datasets():  # imported late so HF_*_OFFLINE apply, and never for .txt corpora (seconds of start-up)
    import datasets

    if quiet():
        datasets.disable_progress_bars()
    return datasets


def _record_files(builder: str, paths: list[Path], field: str, cache_dir: str | None) -> Documents:
    datasets = _datasets()
    try:
        with _library_errors_unlogged():  # a malformed file is reported below, in one line
            table = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                                          cache_dir=cache_dir)
    except Exception as err:  # a malformed file fails deep inside datasets or pyarrow: find and name it
        raise UserError(_bad_record_file(builder, paths, field) or (
            f"cannot read the {builder} files of data.files ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check that each is valid {builder}")) from None
    if field not in table.column_names:
        raise UserError(_bad_record_file(builder, paths, field) or
                        f"{builder} files have no field {field!r} (fields: {table.column_names}); set "
                        "data.text_field")
    column = table.data.column(field)
    if column.null_count or not _is_string(column.type):
        raise UserError(_bad_record_file(builder, paths, field) or
                        f"{builder} files hold records whose {field!r} is not text ({column.type}, "
                        f"{column.null_count} missing); fix them or set data.text_field")
    return ArrowDocuments(_text_column(table, field, f"{builder} files"))


@contextlib.contextmanager
def _library_errors_unlogged() -> Iterator[None]:
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_string(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _text_column(table: Any, field: str, what: str) -> Any:
    if field not in table.column_names:
        raise UserError(f"{what} have no field {field!r} (fields: {table.column_names}); set data.text_field")
    table = table.select_columns([field])
    return table.rename_column(field, "text") if field != "text" else table


def _bad_record_file(builder: str, paths: list[Path], field: str) -> str | None:
    """The first problem in `paths`, read one file at a time, as a message with the fix; None if none is
    found (then the caller reports the library's error)."""
    check = _bad_parquet if builder == "parquet" else _bad_json
    for path in paths:
        problem = check(path, field)
        if problem is not None:
            return problem
    return None


def _bad_json(path: Path, field: str) -> str | None:
    fix = "fix or remove it from data.files"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return f"{path} is not UTF-8 text (offset {e.start}): a binary file? {fix}"
    except OSError as e:
        return f"cannot read {path} ({e.strerror}); {fix}"
    try:  # a whole-file JSON document: a list of records (.json)
        records = json.loads(text)
        records = records if isinstance(records, list) else [records]
        where = "record"
    except ValueError:  # JSON lines
        records, where = [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except ValueError as e:
                    return f"{path} line {number} is not JSON ({e}); {fix}"
    else:
        records = list(enumerate(records, 1))
    for number, record in records:
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            found = (f"no field {field!r} (fields: {sorted(record)})" if isinstance(record, dict)
                     and field not in record else f"no text in {field!r} ({type(value).__name__})")
            return f"{path} {where} {number} has {found}; set data.text_field, or {fix}"
    return None


def _bad_parquet(path: Path, field: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            return (f"{path} has no column {field!r} (columns: {parquet.schema_arrow.names}); set "
                    "data.text_field, or fix or remove it from data.files")
        column = parquet.read(columns=[field]).column(field)
    except Exception as e:  # pyarrow's errors for a damaged or foreign file have several types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{path} is not a readable Parquet file ({reason}); re-create it or remove it from data.files"
    if not _is_string(column.type):
        return f"{path} column {field!r} is {column.type}, not text; set data.text_field"
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        return f"{path} row {row} has no text in {field!r} (null); fix or remove it from data.files"
    return None
