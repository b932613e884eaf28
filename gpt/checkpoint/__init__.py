"""Checkpoints: the on-disk format and its verification (`storage`), the one policy for reading their files as
data (`safe_loading`), and the trainer's component that decides when to save and resumes (`checkpointer`).

The format's public names are importable from the package itself; the trainer's component is imported from
`gpt.checkpoint.checkpointer`, so that reading a checkpoint (evaluation, export) does not load the runtime.
"""

from gpt.checkpoint.safe_loading import (
    DamagedCheckpoint,
    UnsafeCheckpoint,
    load_into,
    load_state_file,
    load_whole,
)
from gpt.checkpoint.storage import (
    FORMAT_VERSION,
    MANIFEST,
    SHARDED_DIR,
    STATE_FILE,
    CheckpointDir,
    first_nonfinite,
    hash_own_files,
    load_model_weights,
    load_training_state,
    read_manifest,
    save_training_state,
    sha256_file,
    start_training_state_save,
)

__all__ = ["FORMAT_VERSION", "MANIFEST", "SHARDED_DIR", "STATE_FILE", "CheckpointDir", "DamagedCheckpoint",
           "UnsafeCheckpoint", "first_nonfinite", "hash_own_files", "load_into", "load_model_weights",
           "load_state_file", "load_training_state", "load_whole", "read_manifest", "save_training_state",
           "sha256_file", "start_training_state_save"]
