# Sourced by scripts/test.sh: `old_transformers` installs the oldest transformers the `hf` extra allows (its
# floor in pyproject.toml) and the newest 4.x (whose default SDPA attention ignores
# scale_attn_by_inverse_layer_idx), each with its dependencies into its own folder under
# .venv-old-transformers/ (pip --target: no torch, which stays the active environment's), and prints the
# folders separated by ":". tests/gpt/test_hf_versions.py loads exports under each of them (put first on
# PYTHONPATH) when SOPHIA_OLD_TRANSFORMERS names them. A folder is installed once and then reused.

old_transformers() {
    local floor spec dir folders=()
    floor=$(sed -n 's/^hf = \[.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
    [ -n "$floor" ] || { echo "error: no transformers>=X in the hf extra of pyproject.toml" >&2; return 2; }
    for spec in "transformers==$floor" "transformers>=4,<5"; do
        dir="$PWD/.venv-old-transformers/$(echo "$spec" | tr -c 'A-Za-z0-9.=\n' '_')"
        if [ ! -f "$dir/.complete" ]; then
            echo "installing $spec into $dir" >&2
            rm -rf "$dir"
            pip install --quiet --disable-pip-version-check --target "$dir" "$spec" "safetensors>=0.4" >&2
            touch "$dir/.complete"
        fi
        folders+=("$dir")
    done
    (IFS=:; echo "${folders[*]}")
}
