#!/usr/bin/env bash
# One command for a lent GPU box: build, test, sanitise, benchmark, collect. From the repo root:
#
#   LRC_COMMIT=<sha> bash tools/gpu_suite.sh [STAGE ...]
#
# Stages, run in the order given:
#   info      nvidia-smi, python/torch/CUDA/nvcc versions, tools present
#   build     LRC_CUDA=ON pip wheel + install, no build isolation, no deps, nothing fetched;
#             skipped when this machine already built the same sources; installs a carried
#             wheel .carry/wheel-<src hash>/*.whl instead of building when present; the built
#             wheel goes to $OUT/wheel-<src hash>/ so a later call can carry it. Then step
#             cutlass_built: `python -m lrc_ext.info --json` must say cutlass_kernels true
#             (recorded as failed if not; the suite goes on). The CUTLASS headers come from the
#             nvidia-cutlass wheel, which the GPU image lacks: carry it in .whl/ (see below)
#   test      python3 -m pytest -m "cuda and not slow" (junit XML; tests/test_clone_linear_cutlass.py
#             included: its fixture sets LRC_CUTLASS=1), then LRC_CUTLASS=1 over the CUDA tests
#             of tests/test_clone_linear.py through tools/cutlass_dispatch.py (fails when no
#             call took the CUTLASS path on a machine that should take it)
#   sanitize  compute-sanitizer over tests/test_clone_linear_cutlass.py -k cuda_matches_reference:
#             memcheck (both dtypes), racecheck and synccheck (bfloat16); then memcheck
#             (PYTORCH_NO_CUDA_MEMORY_CACHING=1) and racecheck over a few CUDA tests of each
#             other test file (the first parametrisation of each test function, at most
#             LRC_SANITIZE_PER_FILE per file, none whose name says compile or bench) when
#             the budget has 90 s for each; only kernels whose mangled name holds "lrc"
#             instrumented (the CUTLASS GEMMs' do: their epilogue types are in lrc::sm90)
#   micro     every bench/bench_*.py except bench_step.py, each with --json
#   step      bench/bench_step.py --shape S for S in $LRC_STEP_SHAPES, each with --json
#   fulltest  the whole test suite (python3 -m pytest -q, junit XML)
#   collect   tools/collect_results.py -> $OUT/results-<date>-<device>-<commit>[-TAG].{json,md}
#             and $OUT/logs.tar.gz (always runs last, also when no stage is named)
# Presets: all (default) = info build test sanitize micro step collect
#          call1 = info build test micro step          (a session's 15 minutes of device time:
#                  budget 480 s; device call timeout_s 540, carry .whl)
#          call2 = info build sanitize                 (at once after call1, the machine warm:
#                  budget 180 s; timeout_s 240; bench/results/README.md, "How to run")
#          part1 = info build test sanitize micro      (two 10-minute calls, for a session
#          part2 = info build step fulltest             with 20 minutes or more; carry .carry/)
#
# Environment: OUT (results; default ./out), LRC_COMMIT (the box has no .git),
#   LRC_SUITE_BUDGET (seconds for the whole call, default 550, call1 480, call2 180: a step
#   that would not fit is skipped and recorded, every step runs under `timeout`; after
#   every step $OUT/partial[-TAG].tar.gz holds what the call has so far, in case the call
#   is killed before collect, which removes it), LRC_SUITE_WORK (scratch,
#   default /tmp/lrc_suite, reused by a later call while the machine is warm),
#   LRC_QUICK=1 (--quick to the benchmarks), LRC_STEP_SHAPES (default "lrc1.5b smollm2"),
#   LRC_STEP_ARGS (extra bench_step.py arguments), LRC_ARGS_<bench name> (extra arguments
#   of one microbenchmark; bench_clone_linear gets --compile-mode default unless set),
#   LRC_SANITIZE_PER_FILE (default 4), LRC_SANITIZE_ALL=1 (instrument every kernel, not
#   only lrc_ext's), LRC_CUDA_ARCHS (default "80;90a", what tests/test_info.py expects),
#   LRC_CUDA (default ON with a GPU), PYTHON (default python3).
# Without a GPU: info runs, build runs only with LRC_SUITE_BUILD=1 (else the installed or
# in-tree build is used), test and sanitize are recorded as skipped, micro and step run
# their CPU shapes (--quick; compile mode with the "eager" dynamo backend), collect runs.
# Exit status: 0 when every step that ran passed, 1 otherwise (results are written either way).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
START=$(date +%s)
RESERVE=25           # seconds kept for collect
OUT=${OUT:-$ROOT/out}
WORK=${LRC_SUITE_WORK:-/tmp/lrc_suite}
PY=${PYTHON:-python3}
TAG=""
budget=550

# ---- stages asked for
stages=()
for a in "${@:-all}"; do
  case "$a" in
    all) stages+=(info build test sanitize micro step) ;;
    call1) stages+=(info build test micro step); TAG=call1; budget=480 ;;
    call2) stages+=(info build sanitize); TAG=call2; budget=180 ;;
    part1) stages+=(info build test sanitize micro); TAG=part1 ;;
    part2) stages+=(info build step fulltest); TAG=part2 ;;
    info|build|test|sanitize|micro|step|fulltest|collect) stages+=("$a") ;;
    *) echo "gpu_suite: unknown stage '$a' (info build test sanitize micro step fulltest collect | all call1 call2 part1 part2)"; exit 2 ;;
  esac
done
BUDGET=${LRC_SUITE_BUDGET:-$budget}
DEADLINE=$(( START + BUDGET ))

mkdir -p "$OUT" "$WORK/json" "$WORK/logs"
touch "$WORK/steps.jsonl"   # kept across calls on a warm machine: collect reports every step
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# ---- carried wheels for packages the box lacks (README of the device tool)
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_suite: installing carried wheels from .whl/ into /tmp/site"
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_suite: WARNING: installing .whl/*.whl failed; going on without them"
  fi
fi

HAVE_GPU=0
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then HAVE_GPU=1; fi
HAVE_GPU=${LRC_SUITE_ASSUME_GPU:-$HAVE_GPU}   # =1 exercises the GPU stages' plumbing on a CPU machine
FAILED=0

# record STEP STATUS RC SECONDS NOTE  (one JSON line; NOTE: plain text)
record() {
  local note=${5//\\/\/}; note=${note//\"/\'}; note=$(printf '%s' "$note" | tr -d '\000-\037')
  printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "note": "%s", "tag": "%s", "gpu": %s, "at": "%s"}\n' \
    "$1" "$2" "$3" "$4" "${note:0:300}" "$TAG" "$HAVE_GPU" "$(date -u +%FT%TZ)" >> "$WORK/steps.jsonl"
  [ "$2" = ok ] || [ "$2" = skipped ] || FAILED=1
  checkpoint
}

# What the call has so far (bench JSON, steps, junit, logs but the build's whole log), in
# $OUT, after every step: it comes back even when the call is killed before collect.
checkpoint() {
  local items=(json steps.jsonl logs) f p="$OUT/partial${TAG:+-$TAG}.tar.gz"
  for f in "$WORK"/junit_*.xml "$WORK"/lrc_ext_info.json; do [ -f "$f" ] && items+=("$(basename "$f")"); done
  tar czf "$p.tmp" --exclude=logs/build.log -C "$WORK" "${items[@]}" 2>/dev/null && mv -f "$p.tmp" "$p"
  rm -f "$p.tmp"
}

left() { echo $(( DEADLINE - $(date +%s) - RESERVE )); }

# run_step NAME CAP_SECONDS CMD...: runs CMD under timeout min(CAP, budget left), output to
# $WORK/logs/NAME.log, prints the log's tail, records the result.
run_step() {
  local name=$1 cap=$2; shift 2
  local l; l=$(left)
  if (( l < 20 )); then
    echo "=== [$name] skipped: ${l}s of the budget left"
    record "$name" skipped null 0 "budget: ${l}s left"
    return 0
  fi
  local t=$(( cap < l ? cap : l ))
  local log="$WORK/logs/$name.log" t0 rc dt st note=""
  echo "=== [$name] $(date -u +%H:%M:%S) timeout ${t}s: $*"
  t0=$(date +%s)
  timeout -k 15 "$t" "$@" > "$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then st=ok; elif (( rc == 124 || rc == 137 )); then st=timeout; note="stopped after ${t}s"; else st=failed; fi
  tail -n "${LRC_TAIL:-25}" "$log" | cut -c1-400
  echo "=== [$name] $st rc=$rc in ${dt}s"
  record "$name" "$st" "$rc" "$dt" "$note"
  return $rc
}

skip() { echo "=== [$1] skipped: $2"; record "$1" skipped null 0 "$2"; }

src_hash() {
  { cat pyproject.toml CMakeLists.txt; find csrc python third_party -type f 2>/dev/null | LC_ALL=C sort | xargs cat; } \
    | sha256sum | cut -c1-16
}

# ------------------------------------------------------------------------------- stages
stage_info() {
  local log="$WORK/logs/info.log"
  {
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cpus: $(nproc)  budget: ${BUDGET}s  gpu: $HAVE_GPU"
    nvidia-smi 2>&1 | head -20 || echo "no nvidia-smi"
    $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    command -v nvcc > /dev/null && nvcc --version | tail -2 || echo "no nvcc"
    echo "compute-sanitizer: $(command -v compute-sanitizer || echo none)"
    $PY -c "import transformers, importlib.util as u; print('transformers', transformers.__version__, '| liger_kernel', bool(u.find_spec('liger_kernel')), '| pytest_timeout', bool(u.find_spec('pytest_timeout')))"
  } > "$log" 2>&1
  cat "$log"
  record info ok 0 0 ""
}

write_env() {  # metadata after the build (it records what lrc_ext was built with)
  $PY - "$WORK/json/env.json" <<'EOF' > /dev/null 2>&1 || true
import json, sys
sys.path.insert(0, "bench")
import common
json.dump({"kind": "env", "meta": common._jsonable(common.metadata())}, open(sys.argv[1], "w"), indent=1)
EOF
}

stage_build() {
  build_or_reuse
  check_cutlass
}

# After the build: are the CUTLASS sm90 kernels in? Recorded (failed when not, on a GPU
# machine); the suite goes on either way.
check_cutlass() {
  local j="$WORK/lrc_ext_info.json" log="$WORK/logs/lrc_ext_info.log" v rc
  $PY -m lrc_ext.info --json > "$j" 2> "$log"
  cat "$j" >> "$log"
  v=$($PY - "$j" 2>> "$log" <<'EOF'
import importlib.util as u, json, sys
try:
    i = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"python -m lrc_ext.info --json gave no JSON ({type(e).__name__})")
    sys.exit(1)
print(f"cutlass_kernels={str(i.get('cutlass_kernels')).lower()}; archs {','.join(i.get('cuda_archs') or []) or '-'}; "
      f"nvidia-cutlass on this machine: {'yes' if u.find_spec('cutlass_library') else 'no (carry .whl/)'}; "
      f"{i.get('cutlass_path')}")
sys.exit(0 if i.get("cutlass_kernels") is True else 1)
EOF
)
  rc=$?
  echo "=== [cutlass_built] $v"
  if [ "$HAVE_GPU" = 0 ]; then record cutlass_built skipped null 0 "no GPU: $v"
  elif (( rc == 0 )); then record cutlass_built ok 0 0 "$v"
  else record cutlass_built failed "$rc" 0 "$v"; fi
}

build_or_reuse() {
  local h; h=$(src_hash)
  if [ "$HAVE_GPU" = 0 ] && [ "${LRC_SUITE_BUILD:-0}" != 1 ]; then
    skip build "no GPU: using the existing build (LRC_SUITE_BUILD=1 to build anyway)"; return
  fi
  if [ -f "$WORK/build.stamp" ] && [ "$(cat "$WORK/build.stamp")" = "$h" ] && \
     (cd /tmp && $PY -c "import lrc_ext._C") 2>/dev/null; then
    skip build "already built on this machine (sources $h)"; sync_py; return
  fi
  local carried; carried=$(ls .carry/wheel-"$h"/lrc_ext-*.whl 2>/dev/null | head -1)
  if [ -n "$carried" ]; then
    if run_step build_carried 120 $PY -m pip install --no-index --no-deps --no-build-isolation --force-reinstall "$carried"; then
      echo "$h" > "$WORK/build.stamp"; sync_py; return
    fi
  fi
  local cuda=${LRC_CUDA:-$([ "$HAVE_GPU" = 1 ] && echo ON || echo AUTO)}
  rm -rf "$WORK/wheel"
  if run_step build 420 env LRC_CUDA="$cuda" LRC_CUDA_ARCHS="${LRC_CUDA_ARCHS:-80;90a}" \
       CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
       $PY -m pip wheel -v --no-build-isolation --no-deps --no-index -w "$WORK/wheel" \
       --config-settings=build-dir="$WORK/skbuild" . ; then
    if run_step install 120 $PY -m pip install --no-index --no-deps --force-reinstall "$WORK"/wheel/lrc_ext-*.whl; then
      echo "$h" > "$WORK/build.stamp"
      sync_py
      local w; w=$(ls "$WORK"/wheel/lrc_ext-*.whl | head -1)
      if [ -n "$w" ] && [ "$(stat -c %s "$w")" -lt 16000000 ]; then
        mkdir -p "$OUT/wheel-$h" && cp "$w" "$OUT/wheel-$h/"
        echo "gpu_suite: wheel kept as $OUT/wheel-$h/$(basename "$w") (carry it as .carry/wheel-$h/ to skip the next build)"
      fi
    fi
  fi
  grep -E "lrc_ext:" "$WORK/logs/build.log" 2>/dev/null | head -5
  tail -n 300 "$WORK/logs/build.log" > "$WORK/logs/build-tail.log" 2>/dev/null
  grep -E "warning|error" "$WORK/logs/build.log" 2>/dev/null | grep -v -E "^\s*$|-Werror|Wno-" | head -20
}

# The tree's Python files win over the installed copy's (a carried wheel may hold older
# ones): copy lrc_ext/**/*.py over the installed package.
sync_py() {
  local dst; dst=$(cd /tmp && $PY -c "import lrc_ext, os; print(os.path.dirname(lrc_ext.__file__))" 2>/dev/null)
  if [ -n "$dst" ] && [ "$dst" != "$ROOT/lrc_ext" ] && [ -d "$dst" ]; then
    (cd lrc_ext && find . -name "*.py" -exec cp --parents {} "$dst"/ \;)
  fi
}

stage_test() {
  if [ "$HAVE_GPU" = 0 ]; then skip test "no GPU"; return; fi
  run_step test_cuda 180 $PY -m pytest -m "cuda and not slow" -q -p no:cacheprovider -rfE --continue-on-collection-errors \
    --junitxml="$WORK/junit_cuda.xml" tests
  # The op's CUDA tests again with LRC_CUTLASS=1: eligible calls go through the dispatch.
  run_step test_cuda_cutlass_dispatch 90 env LRC_CUTLASS=1 $PY tools/cutlass_dispatch.py -m cuda -q -rfE \
    --junitxml="$WORK/junit_cuda_cutlass_dispatch.xml" tests/test_clone_linear.py
}

stage_fulltest() {
  local l; l=$(left)
  if (( l < 150 )); then skip test_full "budget: ${l}s left, the whole suite needs more"; return; fi
  run_step test_full 300 $PY -m pytest -q -p no:cacheprovider -rfE --continue-on-collection-errors \
    --junitxml="$WORK/junit_full.xml" tests
}

stage_sanitize() {
  if [ "$HAVE_GPU" = 0 ]; then skip sanitize "no GPU"; return; fi
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$SAN" ]; then skip sanitize "compute-sanitizer not found"; return; fi
  # The CUTLASS kernels first: the newest code. fp16 and bf16 are separate instantiations, so
  # memcheck takes both; racecheck and synccheck (barriers, not types) bf16 only.
  local cut=tests/test_clone_linear_cutlass.py k=cuda_matches_reference
  if $PY -c "import sys; from lrc_ext.ops import _cutlass; sys.exit(0 if _cutlass.built() else 1)" 2>/dev/null; then
    sanitize_run sanitize_memcheck_cutlass 100 memcheck "$cut" -k "$k"
    sanitize_run sanitize_racecheck_cutlass 80 racecheck "$cut" -k "$k and bfloat16"
    if (( $(left) >= 60 )); then sanitize_run sanitize_synccheck_cutlass 60 synccheck "$cut" -k "$k and bfloat16"
    else skip sanitize_synccheck_cutlass "budget: $(left)s left"; fi
  else
    skip sanitize_cutlass "lrc_ext built without the CUTLASS sm90 kernels"
  fi
  sanitize_generic "$cut"
}

# A few CUDA tests of every other test file, memcheck and racecheck, when 90 s are left for each.
sanitize_generic() {
  $PY - "${LRC_SANITIZE_PER_FILE:-4}" "$1" > "$WORK/sanitize_ids.txt" 2> "$WORK/logs/sanitize-ids.log" <<'EOF'
import subprocess, sys
k, exclude = int(sys.argv[1]), sys.argv[2]
r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                    "--continue-on-collection-errors", "-m", "cuda and not slow", "tests"],
                   capture_output=True, text=True)
seen, per_file = set(), {}
for line in r.stdout.splitlines():
    if "::" not in line or line.startswith(" "):
        continue
    f, rest = line.split("::", 1)
    fn = rest.split("[", 1)[0]
    if f == exclude or "compile" in fn or "bench" in fn:  # inductor / subprocess runs: slow under the tool
        continue
    if (f, fn) in seen or per_file.get(f, 0) >= k:
        continue
    seen.add((f, fn)); per_file[f] = per_file.get(f, 0) + 1
    print(line.strip())
EOF
  local ids tool
  mapfile -t ids < "$WORK/sanitize_ids.txt"
  if (( ${#ids[@]} == 0 )); then skip sanitize "no CUDA tests collected"; return; fi
  echo "gpu_suite: sanitizing ${#ids[@]} tests: ${ids[*]}"
  for tool in memcheck racecheck; do
    if (( $(left) < 90 )); then skip "sanitize_$tool" "budget: $(left)s left"; continue; fi
    sanitize_run "sanitize_$tool" 200 "$tool" "${ids[@]}"
  done
}

# sanitize_run NAME CAP TOOL PYTEST_ARGS...: one compute-sanitizer pass, log $WORK/logs/NAME.log
# (tools/collect_results.py reads every sanitize_*.log).
sanitize_run() {
  local name=$1 cap=$2 tool=$3; shift 3
  local envs=() filt=() log="$WORK/logs/$name.log"
  [ "$tool" = memcheck ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  [ "${LRC_SANITIZE_ALL:-0}" = 1 ] || filt=(--kernel-name kns=lrc)
  # API errors are left to the tests (our launches check their own); torch's benign ones would be noise
  run_step "$name" "$cap" env "${envs[@]}" "$SAN" --tool "$tool" "${filt[@]}" --error-exitcode 97 \
    --report-api-errors no --print-limit 20 $PY -m pytest -q -p no:cacheprovider -x "$@"
  # A kernel filter this compute-sanitizer does not take: run once more without it.
  if [ ${#filt[@]} -gt 0 ] && ! grep -q "ERROR SUMMARY\|RACECHECK SUMMARY" "$log" && grep -qi "kernel-name\|invalid\|unrecognized" "$log"; then
    echo "gpu_suite: the kernel filter was refused; sanitizing every kernel"
    run_step "$name" "$cap" env "${envs[@]}" "$SAN" --tool "$tool" --error-exitcode 97 \
      --report-api-errors no --print-limit 20 $PY -m pytest -q -p no:cacheprovider -x "$@"
  fi
  echo "SANITIZED: $*" >> "$log"
}

quick_flag() {
  if [ "${LRC_QUICK:-0}" = 1 ] || [ "$HAVE_GPU" = 0 ]; then echo --quick; fi
}

# Extra arguments of a microbenchmark: LRC_ARGS_<name>, e.g.
#   LRC_ARGS_bench_clone_linear="--compile-mode max-autotune"   (minutes a case on an H100)
# Default for bench_clone_linear: --compile-mode default (seconds), so the suite fits its call.
stage_micro() {
  local f name q var extra; q=$(quick_flag)
  : "${LRC_ARGS_bench_clone_linear=--compile-mode default}"
  for f in bench/bench_*.py; do
    name=$(basename "$f" .py)
    [ "$name" = bench_step ] && continue
    local cap=240
    # the op of this commit first (alphabetical: it runs first); the JSON is rewritten after
    # every case, so a run stopped at its cap keeps the cases it finished
    [ "$name" = bench_clone_linear ] && cap=200
    var="LRC_ARGS_$name"; extra=${!var:-}
    if grep -q -- "--json" "$f"; then
      run_step "$name" "$cap" $PY "$f" --json "$WORK/json/$name.json" $q $extra
    else
      run_step "$name" "$cap" $PY "$f" $q $extra
    fi
  done
}

stage_step() {
  local shapes=${LRC_STEP_SHAPES:-lrc1.5b smollm2} s cap extra=()
  if [ "$HAVE_GPU" = 0 ]; then shapes=tiny; extra=(--quick --compile-backend eager); fi
  [ "${LRC_QUICK:-0}" = 1 ] && extra+=(--quick)
  for s in $shapes; do
    cap=330; [ "$s" = lrc1.5b ] || cap=180
    local l; l=$(left); (( l < cap )) && cap=$l
    run_step "bench_step_$s" "$cap" $PY bench/bench_step.py --shape "$s" --json "$WORK/json/bench_step_$s.json" \
      --budget-s $(( cap > 90 ? cap - 60 : cap / 2 )) "${extra[@]}" ${LRC_STEP_ARGS:-}
  done
}

stage_collect() {
  write_env
  local junit=() f
  for f in "$WORK"/junit_*.xml; do [ -f "$f" ] && junit+=("$f"); done
  $PY tools/collect_results.py "$WORK/json" --steps "$WORK/steps.jsonl" --junit "${junit[@]}" \
    --logs "$WORK/logs" --out-dir "$OUT" ${TAG:+--tag "$TAG"} --print 2>&1 | tail -c 9000
  # logs, each cut to its last 3000 lines, in one archive
  rm -rf "$WORK/logs_tail" && mkdir -p "$WORK/logs_tail"
  for f in "$WORK"/logs/*.log; do [ -f "$f" ] && tail -n 3000 "$f" > "$WORK/logs_tail/$(basename "$f")"; done
  cp "$WORK/steps.jsonl" "$WORK/logs_tail/" 2>/dev/null
  tar czf "$OUT/logs${TAG:+-$TAG}.tar.gz" -C "$WORK" logs_tail 2>/dev/null
  # the results and logs hold everything the partial archive did
  if compgen -G "$OUT/results-*.json" > /dev/null && [ -f "$OUT/logs${TAG:+-$TAG}.tar.gz" ]; then
    rm -f "$OUT/partial${TAG:+-$TAG}.tar.gz"
  fi
  echo "gpu_suite: $(( $(date +%s) - START ))s; files in $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
}

for st in "${stages[@]}"; do
  [ "$st" = collect ] && continue
  "stage_$st"
done
stage_collect
exit $FAILED
