"""What every package of the project may import without importing another: the user-error class and the
atomic file write. `data/`, `optim/` and `gpt/` all depend on it; it depends on none of them."""
