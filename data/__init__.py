"""Data: tokenizers (`data.tokenizers`), token-file preparation (`data.prepare`), batches (`data.loader`).

Nothing is re-exported here, so that `python -m data.prepare` does not import torch (the loader's dependency)
before forking its tokenising workers; import from the submodules.
"""
