#!/usr/bin/env bash
# Make (or reuse) the virtual environment that `make demo`, `make test` and `.ci/run` run in.
#
#   scripts/setup.sh            torch + distill               (what `make demo` needs)
#   scripts/setup.sh test       torch + distill[test]         (what `make test` needs)
#
# Environment: VENV (default .venv), PYTHON (the interpreter that makes it; default python3),
# TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu).
#
# 1. torch first, at the version constraints.txt pins: with a GPU (nvidia-smi found) the default
#    build from PyPI; without one the CPU build: offline from pip's find-links when they hold torch
#    and its dependencies, else a local `+cpu` wheel with its dependencies from the configured index,
#    else the PyTorch CPU index.
# 2. then `pip install -c constraints.txt -e ".[EXTRAS]"` (the constraints keep pip from swapping torch).
#
# Idempotent: when the venv already holds the pinned torch and this checkout's distill (editable)
# with every package the extras need, and pyproject.toml and constraints.txt are unchanged since the
# last install, nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
TORCH_VERSION="$(sed -n 's/^torch==\([^[:space:]]*\).*/\1/p' constraints.txt | head -n 1)"
if [ -z "$TORCH_VERSION" ]; then
    echo "setup: constraints.txt must pin torch (a line torch==VERSION)" >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.distill-setup"
WANT="$(cat pyproject.toml constraints.txt | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"

# Is everything there already? (exit 0: yes)
ready() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] || return 1
    "$PY" - "$TORCH_VERSION" "$EXTRAS" "$PWD" <<'EOF'
import json, re, sys
from importlib import metadata
from urllib.parse import unquote
from pathlib import Path

torch_version, extras, root = sys.argv[1], {e for e in sys.argv[2].split(",") if e}, Path(sys.argv[3])
try:
    if metadata.version("torch").split("+")[0] != torch_version:
        sys.exit(1)
    dist = metadata.distribution("distill")
except metadata.PackageNotFoundError:
    sys.exit(1)
url = json.loads(dist.read_text("direct_url.json") or "{}")  # an editable install of this checkout
if not url.get("dir_info", {}).get("editable") or unquote(url.get("url", "")).removeprefix("file://") != str(root.resolve()):
    sys.exit(1)
for requirement in dist.requires or []:
    name, _, marker = requirement.partition(";")
    extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if extra and extra.group(1) not in extras:
        continue
    try:
        metadata.distribution(re.match(r"[A-Za-z0-9._-]+", name.strip()).group(0))
    except metadata.PackageNotFoundError:
        sys.exit(1)
EOF
}

if ready; then
    echo "setup: $VENV is ready (torch $TORCH_VERSION, distill${EXTRAS:+[$EXTRAS]}); nothing to install"
    exit 0
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

if "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup: torch $TORCH_VERSION is installed"
elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: a GPU is present: torch==$TORCH_VERSION from PyPI"
    pip_install "torch==$TORCH_VERSION"
else
    echo "setup: no GPU (no nvidia-smi): the CPU build of torch $TORCH_VERSION"
    pip_install --quiet --no-index "torch==$TORCH_VERSION" 2>/dev/null \
        || pip_install --quiet "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        || pip_install --index-url "$CPU_INDEX" "torch==$TORCH_VERSION"
fi

echo "setup: distill${EXTRAS:+[$EXTRAS]} (editable) under constraints.txt"
pip_install --quiet -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
"$PY" -c "import sys, torch; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '$TORCH_VERSION' else f'setup: torch {v} was installed, constraints.txt pins $TORCH_VERSION')"
echo "$WANT" > "$STAMP"
if ! ready; then
    echo "setup: $VENV still lacks a package distill${EXTRAS:+[$EXTRAS]} needs" >&2
    exit 1
fi
echo "setup: $VENV is ready"
