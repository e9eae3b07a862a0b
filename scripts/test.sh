#!/usr/bin/env bash
# Installs Insight with its test dependencies and runs the whole test suite.
# This is the README's test command; .ci/run calls exactly this. pytest's exit 5 ("no tests") fails.
set -uo pipefail
cd "$(dirname "$0")/.."
# browser tests drive Debian's Chromium through chromedriver (never a downloaded browser)
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
      || { echo "could not install chromium and chromium-driver with apt-get" >&2; exit 1; }
  else
    echo "chromium and chromium-driver are missing: install them (apt-get install chromium chromium-driver)" >&2
    exit 1
  fi
fi
# data-parallel tests run `mpirun -n 2`: Debian's OpenMPI (mpi4py, in the test extra, builds against it)
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && apt-get install -y -qq openmpi-bin libopenmpi-dev) >/dev/null 2>&1 \
      || { echo "could not install openmpi-bin and libopenmpi-dev with apt-get" >&2; exit 1; }
  else
    echo "OpenMPI is missing: install it (apt-get install openmpi-bin libopenmpi-dev)" >&2
    exit 1
  fi
fi
python -m pip install --quiet --disable-pip-version-check -e ".[test]" || { echo "install failed" >&2; exit 1; }
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing the run" >&2
  exit 1
fi
exit "$rc"
