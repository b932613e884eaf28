"""Reading torch.distributed.checkpoint (DCP) folders as data: nothing in them can run code.

DCP stores its index (`.metadata`) with plain pickle and non-tensor values (learning rates, betas, step
counts kept as numbers) as `torch.save` blobs that its default planner loads with `weights_only=False`: a
replaced `.metadata` or blob, with its manifest entry recomputed, would run whatever its pickle names. Here
the index is unpickled by an allow-list of DCP's own metadata types (plus `torch.Size`, dtypes, layouts and
paths, which they hold), and every non-tensor value with `weights_only=True`. Anything else is refused with
one line naming the object the file tried to load. Tensors were already read with `weights_only=True` by DCP.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from common.errors import UserError

# (module, name) -> object: the only globals a `.metadata` pickle may name.
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(dcp_metadata.__name__, name): value for name, value in vars(dcp_metadata).items()
       if isinstance(value, type) and value.__module__ == dcp_metadata.__name__},
    (_StorageInfo.__module__, _StorageInfo.__name__): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    **{("pathlib", cls.__name__): cls for cls in (pathlib.PosixPath, pathlib.PurePosixPath,
                                                  pathlib.WindowsPath, pathlib.PureWindowsPath)},
}


class UnsafeCheckpoint(UserError):
    """A sharded checkpoint that names code to run: refused, never loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpoint(
                f"{self.source} names {module}.{name}, which is not checkpoint metadata: refused unloaded "
                "(a checkpoint is data, never code); restore this checkpoint from a trusted copy"
            ) from None


def read_metadata(checkpoint_dir: Path) -> Metadata:
    """The DCP index of `checkpoint_dir`, unpickled through the allow-list."""
    path = Path(checkpoint_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UnsafeCheckpoint:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); restore the checkpoint") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; restore the checkpoint")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the allow-listed metadata unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by this project
            raise UserError(f"{self.path} has per-rank metadata, which this project never writes")
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_value(source: Path, read_item: ReadItem, value: io.BytesIO) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
        raise UnsafeCheckpoint(
            f"{source}: the value {read_item.dest_index.fqn} is not plain data ({detail.strip()}): refused "
            "unloaded (a checkpoint is data, never code); restore this checkpoint from a trusted copy"
        ) from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, loading non-tensor values with `weights_only=True`."""

    source = Path()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _store(self, read_item, _load_value(self.source, read_item, value))


class _SafeWholeLoadPlanner(_EmptyStateDictLoadPlanner):
    """Loads every entry of a checkpoint into an empty state dict (for the export), values as data."""

    source = Path()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _store(self, read_item, _load_value(self.source, read_item, value))


def _store(planner: DefaultLoadPlanner, read_item: ReadItem, value: Any) -> None:
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[fqn], value)
    else:
        planner.state_dict[fqn] = value


def _unwrap(error: BaseException) -> BaseException:
    """DCP wraps an error on any rank into a CheckpointException; ours is reported as itself."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        for failure, _ in failures.values():
            if isinstance(failure, UserError):
                return failure
    return error


def load_into(state: dict[str, Any], checkpoint_dir: Path) -> None:
    """DCP-load `checkpoint_dir` into `state` in place (resharding to this process group's layout)."""
    read_metadata(checkpoint_dir)  # every rank refuses an unsafe index before any collective
    try:
        planner = SafeLoadPlanner()
        planner.source = checkpoint_dir
        dcp.load(state, storage_reader=SafeReader(checkpoint_dir), planner=planner)
    except dcp.CheckpointException as e:
        raise _unwrap(e) from None


def load_whole(checkpoint_dir: Path) -> dict[str, Any]:
    """Every entry of a DCP checkpoint as full tensors in one process (the export's merge)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    read_metadata(checkpoint_dir)
    state: dict[str, Any] = {}
    planner = _SafeWholeLoadPlanner()
    planner.source = checkpoint_dir
    try:
        _load_state_dict(state, storage_reader=SafeReader(checkpoint_dir), planner=planner, no_dist=True)
    except dcp.CheckpointException as e:
        raise _unwrap(e) from None
    return state
