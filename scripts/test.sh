#!/usr/bin/env bash
# Installs Insight with its test dependencies and runs the whole test suite.
# This is the README's test command; .ci/run calls exactly this. pytest's exit 5 ("no tests") fails.
set -uo pipefail
cd "$(dirname "$0")/.."
# Debian packages the suite needs, installed in one apt-get call when missing:
#  - browser tests drive Debian's Chromium through chromedriver (never a downloaded browser);
#  - data-parallel tests run `mpirun -n 2`: Debian's OpenMPI (mpi4py, in the test extra, builds against it)
need=()
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || need+=(chromium chromium-driver)
command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
      || { echo "could not install ${need[*]} with apt-get" >&2; exit 1; }
  else
    echo "missing Debian packages: install them (apt-get install ${need[*]})" >&2
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
