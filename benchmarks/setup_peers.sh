#!/usr/bin/env bash
# Creates one virtualenv per peer system (benchmarks/.venvs/pfl, benchmarks/.venvs/flower) so that
# pfl's and Flower's dependency pins never touch fedmeta's own environment.
#
# torch is installed first and pinned through a constraints file: an unpinned resolve would
# pull a multi-GB CUDA build, and both peers accept any torch 2.x. Safe to run again: pip
# skips what is already satisfied.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$BENCH_DIR")"
VENVS="$BENCH_DIR/.venvs"
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"

CONSTRAINTS="$VENVS/constraints.txt"
mkdir -p "$VENVS"
printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"

# setup_venv NAME PEER_REQUIREMENT...: the venv, torch, the peer, fedmeta (for the data loaders), psutil.
setup_venv() {
    local name="$1"; shift
    local venv="$VENVS/$name"
    if [[ ! -x "$venv/bin/python" ]]; then
        "$PYTHON" -m venv "$venv"
    fi
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
    echo "== $name: $venv"
    "${pip[@]}" install --quiet "torch==$TORCH_VERSION"
    "${pip[@]}" install --quiet -c "$CONSTRAINTS" "$@"
    "${pip[@]}" install --quiet -c "$CONSTRAINTS" -e "$REPO_ROOT" psutil
    echo "== $name: installed"
    "${pip[@]}" list --format=freeze 2>/dev/null \
        | grep -i -E '^(torch|pfl|flwr|ray|numpy|fedmeta|psutil|h5py)==' | sed 's/^/   /'
}

setup_venv pfl "pfl[pytorch]==0.6.0"
setup_venv flower "flwr[simulation]==1.42.*"
