#!/usr/bin/env bash
# Rerun on a lent GPU the pytest node ids listed in a file (one per line: e.g. the tests that failed
# or did not run in a .ci/gpu job), after building the extension; also measures host overhead.
#     bash benchmarks/gpu_checks/rerun_tests.sh IDS_FILE
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
export FASTVIT_CACHE_DIR=/tmp/fvcache PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
t0=$(date +%s)
MAX_JOBS=12 timeout 150 nice -n 19 python -c "
from fastvit import extension
ok = extension.load(build=True)
print('extension loaded:', ok, '| CUDA kernels:', ok and extension.has_cuda_kernels(), '|', extension.unavailable_reason())
" > "$out/extension-build.txt" 2>&1 &
build=$!
timeout 60 python benchmarks/gpu_checks/host_overhead.py "$out" > "$out/host-overhead.txt" 2>&1
head -9 "$out/host-overhead.txt"
wait $build; echo "extension after $(( $(date +%s) - t0 )) s: $(tail -1 "$out/extension-build.txt" | cut -c1-300)"
mapfile -t ids < "${1:?a file of pytest node ids}"
timeout -s INT -k 10 ${TEST_S:-120} python -m pytest -q -p no:cacheprovider -n 12 --timeout 100 "${ids[@]}" \
  --junitxml="$out/pytest-rerun.xml" > "$out/pytest-rerun.txt" 2>&1
echo "pytest exit $? after $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)" "$out/pytest-rerun.txt" | cut -c1-200 | head -30
tail -3 "$out/pytest-rerun.txt"
gzip -9 "$out/pytest-rerun.txt" "$out/pytest-rerun.xml"
