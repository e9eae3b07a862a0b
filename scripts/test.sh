#!/usr/bin/env bash
# Installs Insight with its test dependencies and runs the whole test suite.
# This is the README's test command; .ci/run calls exactly this. pytest's exit 5 ("no tests") fails.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]" || { echo "install failed" >&2; exit 1; }
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing the run" >&2
  exit 1
fi
exit "$rc"
