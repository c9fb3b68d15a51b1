#!/usr/bin/env bash
# Build an older ferroxy into a venv of its own, for `python bench/run.py --baseline`.
#
#   bench/baseline.sh COMMIT [DIR]      # DIR defaults to /tmp/ferroxy-base
#
# DIR becomes a detached git worktree at COMMIT with DIR/.venv (it sees the system's
# packages) and DIR/target (its own cargo target dir). The build uses the release profile
# of COMMIT's Cargo.toml, as a user's `pip install` would: several minutes on 2 cores.
# Remove it afterwards with `git worktree remove --force DIR`.
set -euo pipefail

commit=${1:?usage: bench/baseline.sh COMMIT [DIR]}
dir=${2:-/tmp/ferroxy-base}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)

git -C "$repo" worktree add --detach "$dir" "$commit"
python -m venv --system-site-packages "$dir/.venv"
CARGO_TARGET_DIR="$dir/target" "$dir/.venv/bin/pip" install -q --no-deps "$dir"
"$dir/.venv/bin/python" -c "import ferroxy; print('baseline ferroxy:', ferroxy.__file__)"
echo "run: python bench/run.py --baseline $dir/.venv/bin/python" \
    "--baseline-label $(git -C "$dir" rev-parse --short HEAD)"
