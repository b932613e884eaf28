"""Reading checkpoints as data: nothing in them can run code, and what may not be there means damage.

One policy for every file a run or a tool reads. A single file (`state.pt`, an exported `.pt`) is unpickled
by torch's weights-only loader (tensors and plain containers); sharded checkpoints (torch.distributed.
checkpoint, DCP) store their index (`.metadata`) with plain pickle and non-tensor values (learning rates,
betas, step counts kept as numbers) as `torch.save` blobs that DCP's default planner loads with
`weights_only=False`: here the index is unpickled by an allow-list of DCP's own metadata types (plus
`torch.Size`, dtypes, layouts and paths, which they hold), and every non-tensor value with
`weights_only=True`. A file that names anything else (its manifest entry recomputed to match) is refused
unloaded as a `DamagedCheckpoint`, in one line naming the object, never with torch's advice to load it with
`weights_only=False` (which would run it). A damaged checkpoint is treated like one whose hash fails: a
resume or an evaluation of a run directory falls back to the previous checkpoint, with a warning.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
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


class DamagedCheckpoint(UserError):
    """A checkpoint whose files verify against its manifest but do not hold what a checkpoint may (an object
    not allowed, something other than a training state): skipped like one whose hash fails."""


class UnsafeCheckpoint(DamagedCheckpoint):
    """A checkpoint that names code to run: refused, never loaded."""


def refused_object(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, without its advice to load with weights_only=False."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    if match:
        return f"the object {match.group(1)}"
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and "weights_only" not in line and "Weights only load failed" not in line]
    return lines[0] if lines else "an object a checkpoint may not hold"


def load_state_file(path: Path, required: tuple[str, ...], map_location: Any = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """A single-file checkpoint or export loaded as data: a dict holding at least the `required` entries.
    Anything else is a `DamagedCheckpoint` naming the file and what it holds."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a pickle naming an object the weights-only unpickler does not allow
            raise UnsafeCheckpoint(f"{path} holds {refused_object(e)}, which is not checkpoint data: refused "
                                   "unloaded (a checkpoint is data, never code); restore it from a trusted "
                                   "copy") from None
        raise DamagedCheckpoint(f"{path} is not a readable torch file ({refused_object(e)})") from None
    except (RuntimeError, EOFError, ValueError) as e:  # not a torch file (the zip reader's errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(f"{path} is not a readable torch file ({first})") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise DamagedCheckpoint(f"{path} holds no {', '.join(missing)} (a {type(state).__name__}"
                                + (f" of {', '.join(map(str, state))}" if isinstance(state, dict) else "")
                                + "): not a checkpoint of this project")
    return state


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
        raise DamagedCheckpoint(f"{path} is unreadable ({type(e).__name__}: {e}); restore the checkpoint"
                                ) from None
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpoint(f"{path} holds a {type(metadata).__name__}, not DCP metadata; restore the "
                                "checkpoint")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the allow-listed metadata unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by this project
            raise DamagedCheckpoint(f"{self.path} has per-rank metadata, which this project never writes")
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_value(source: Path, read_item: ReadItem, value: io.BytesIO) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(
            f"{source}: the value {read_item.dest_index.fqn} is not plain data ({refused_object(e)}): "
            "refused unloaded (a checkpoint is data, never code); restore this checkpoint from a trusted copy"
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
