#!/usr/bin/env bash
# One GPU session on a lent machine that has torch, triton, transformers and Python 3.12 but no
# ROS: the GPU tests, the comparison with transformers, and the benchmarks of the hybrid-0.8b preset.
#
#   bash bench/gpu_session.sh STAGE [STAGE ...]
#   stages: tests kernels compare (bf16) compare32 (fp32) runtime capsules paged bringup disk
#           smolvla (SmolVLA at its published shapes; LeRobot's peer column where .whl-lerobot/
#           holds tools/gpu-peer-wheels.sh's wheels) ros (the node through ROS 2: the GPU node
#           tests and bench_ros.py, from tools/gpu-ros-wheels.sh's .whl-ros/)
#
# The device call carries .whl/ and the folders its stages need (64 MiB in all with the checkout:
# .whl-lerobot/ and .whl-ros/ do not fit in one call together). A fresh machine compiles every
# Triton kernel on first use: the tests stage's first runtimes take minutes there.
#
# fla travels as wheels in .whl/ (../shared/tools/gpu-wheels.sh fetches them). Logs go to $OUT
# (or ./out) as <stage>.log; the benchmarks write their tables under docs/bench/, and what they
# wrote comes back in $OUT/docs-bench.tgz.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-out}"
# a copy made by `git archive` names its commit in ./COMMIT (bench/common.py records it in every
# table, also for a bench run outside this script)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-core .whl/fla_core-*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

rc=0
run() {   # run STAGE COMMAND...: the command's output in $out/STAGE.log, its status remembered
  local stage="$1"; shift
  echo "== $stage: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$stage.log" | tail -n 25
  local status=${PIPESTATUS[0]}
  echo "== $stage: exit $status after $((SECONDS - t0)) s"
  [ "$status" -eq 0 ] || rc=1
  # what the benchmarks wrote so far comes back with $OUT, as one archive (also if a later stage
  # runs past the call's time limit)
  find docs/bench -newer "$out/gpu.txt" -type f -print0 | tar czf "$out/docs-bench.tgz" --null -T -
}

for stage in "$@"; do
  case "$stage" in
    tests)    run tests python3 -m pytest -q -m gpu test/ -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} ;;
    kernels)  run kernels python3 bench/bench_kernels.py ;;
    compare)  run compare python3 bench/compare_transformers.py --device cuda ;;
    compare32) run compare32 python3 bench/compare_transformers.py --device cuda --dtype float32 ;;
    runtime)  run runtime python3 bench/bench_runtime.py --device cuda --profile --peer ;;
    capsules) run capsules python3 bench/bench_capsules.py --preset hybrid-0.8b --device cuda \
                --contexts 2048,16384 ;;
    paged)    run paged python3 bench/bench_paged.py --preset hybrid-0.8b --device cuda ;;
    # fla's kernels only (fla-core): see setup.py's gpu extra
    bringup)  PYTHONPATH="/tmp/site-core:$PWD" run bringup python3 bench/bench_bringup.py \
                --preset hybrid-0.8b --device cuda --paths runtime --seed-rng device ;;
    disk)     run disk python3 bench/bench_disk.py --device cuda --out docs/bench ;;
    smolvla)
      if ls .whl-lerobot/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target /tmp/site-lerobot .whl-lerobot/*.whl || exit 1
        PYTHONPATH="/tmp/site-lerobot:$PYTHONPATH" run smolvla python3 bench/bench_smolvla.py \
          --device cuda
      else
        run smolvla python3 bench/bench_smolvla.py --device cuda --no-peer
      fi ;;
    ros)
      # shellcheck source=/dev/null
      source tools/gpu-ros-setup.sh || exit 1
      run ros-tests python3 -m pytest -q -rs -p no:cacheprovider test/test_node_gpu.py \
        test/test_node_cameras.py test/test_bench_ros.py
      run ros python3 bench/bench_ros.py --preset hybrid-0.8b --device cuda --steps 300 \
        --calls 50 --duration 20 --nice 0 --out docs/bench/ros-h100 ;;
    *) echo "unknown stage $stage (tests kernels compare compare32 runtime capsules paged bringup" \
            "disk smolvla ros)" >&2
       rc=2 ;;
  esac
done
exit "$rc"
