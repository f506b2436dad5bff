#!/usr/bin/env bash
# One GPU-machine session in as few device calls as possible (see README, "GPU runs").
#
# Here:  make device-wheels      # .whl/: what the machine's image lacks (about 20 MiB)
# There (device tool `run`, carry [".whl"], one call at most 10 minutes):
#   PAPER_LIB_GIT=<commit> .ci/gpu_session.sh start [PLAN | STAGE ...]   # first call
#   .ci/gpu_session.sh wait                                               # any later call
# Anywhere: .ci/gpu_session.sh plan [PLAN | STAGE ...] prints each stage's command.
#
# A lease is 15 minutes of device time, the machine's start (a minute or two) and every
# idle wait included: one `start` call that ends within about 9 minutes, then give_back.
# So the work comes in plans, each sized for one lease (times from the H100 runs; the
# H200 lent since is the same chip with faster memory):
#   kernels    env tests bench          issue #10's step numbers (the default): tests ~1-2
#                                       min with autotuning off, bench ~4-6 min
#   notebooks  env prepare 01 05        prepare 1-3.5 min (the gpu LM), 01 4-7 min before its
#                                       λ sweep gained a second run on its own draw (5 top-AFA
#                                       SAEs, lambda_seeds = 2): ~+1 min estimated; 05 1 min
#   withdrawn  env prepare 02 04        the records with withdrawn claims (claims.WITHDRAWN,
#                                       2026-12-06): 02 165-180 s, 04 160 s; one lease
#   probes     env prepare 03           03's withdrawn probe claims (same date): 03 260-290 s
#                                       before its probe comparisons gained probe_seeds - 1 = 2
#                                       more runs, each harvesting its own draw (8 s, 16 GB:
#                                       two draws on the GPU at once) and training 6 SAEs (the
#                                       5 TopK sizes at the probe k, ReLU): ~+90 s estimated
#   rest       env prepare 04 03 02     04 160 s, 03 260-290 s, 02 165-180 s: more than one
#                                       lease; rerun only what changed since results/gpu
#
# `start` installs the wheels, copies the tree to /tmp/gpu/repo (later calls re-sync the
# tree the tool sends; the runner's results must not be overwritten) and starts the stages
# in the background, in their own process session so they outlive the call. Each call
# then waits up to WAIT_S seconds (default 500) and copies what is done into $OUT:
# status.tsv (stage, exit code, seconds), logs.tgz, results.tgz (results/gpu,
# figures/gpu, results/bench (a bench cut short leaves its rows in <gpu>.partial.json) and
# the executed notebooks in build/gpu of the runner's copy; they are committed as
# results/gpu/<notebook>.ipynb). The machine goes back 30 s after a call, and the stages
# with it: after a loss, `start` again with the stages not yet done.
#
# Stages (a failing stage is recorded and the rest go on, except env, which stops the
# session):
#   env      driver, versions, every import the later stages need
#   tests    the CUDA tests (test_kernels, test_stack, test_fused, test_bench_gpu, test_train) with
#            PAPER_LIB_TRITON_AUTOTUNE=0: each Triton kernel's default configuration (the
#            CPU tests check every candidate; tuning each test shape costs minutes)
#   bench    python -m paper_lib.bench at the four TopK sizes, the largest batch first (the
#            5 M tok/s question), all strategies, then the stacked-SAE rows (many SAEs per
#            pass: three sizes, seconds), no harvest rows (measured, #4); the log
#            shows the Triton autotuner's picks and full compiler tracebacks
#   bench-full  the whole default benchmark, harvest included
#   prepare  the gpu profile's LM and shared activations (reproduce --prepare)
#   NN       notebook NN at the gpu profile (reproduce --profile gpu --only NN)
set -uo pipefail

WORK=${GPU_WORK:-/tmp/gpu}
REPO=$WORK/repo
WAIT_S=${WAIT_S:-500}
PROFILE=${PROFILE:-gpu}  # smoke: try this script on a CPU machine
BENCH_CONFIGS="768x32768x32x65536 768x32768x32x16384 768x32768x32x4096 2304x65536x64x4096"

plan_stages() {  # the stages of a plan name, or nothing
    case $1 in
        kernels) echo "env tests bench" ;;
        notebooks) echo "env prepare 01 05" ;;
        withdrawn) echo "env prepare 02 04" ;;
        probes) echo "env prepare 03" ;;
        rest) echo "env prepare 04 03 02" ;;
        *) return 1 ;;
    esac
}

setup_env() {
    export PROFILE PYTHONPATH=/tmp/site:$REPO PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
        HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
}

stage_cmd() {  # the command of one stage, run in $REPO
    case $1 in
        env) echo 'nvidia-smi || echo "no nvidia-smi"; python3 -c "
import importlib, torch
for m in (\"transformer_lens\", \"datasets\", \"papermill\", \"nbclient\", \"ipywidgets\",
          \"sparsify\", \"transformers\", \"huggingface_hub\", \"triton\"):
    mod = importlib.import_module(m)
    print(m, getattr(mod, \"__version__\", \"?\"))
print(\"torch\", torch.__version__, torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA\")
import paper_lib.reproduce, paper_lib.bench" && python3 -m paper_lib.kernelspec' ;;
        tests) echo 'PAPER_LIB_TRITON_AUTOTUNE=0 python3 -m pytest -q -rs tests/test_kernels.py' \
                    'tests/test_stack.py tests/test_fused.py tests/test_bench_gpu.py' \
                    'tests/test_train.py' ;;
        bench) echo 'TORCHDYNAMO_VERBOSE=1 TRITON_PRINT_AUTOTUNING=1 python3 -m paper_lib.bench' \
                    "--configs $BENCH_CONFIGS --skip harvest" ;;
        bench-full) echo 'TORCHDYNAMO_VERBOSE=1 TRITON_PRINT_AUTOTUNING=1' \
                         'python3 -m paper_lib.bench' ;;
        prepare) echo 'python3 -m paper_lib.reproduce --profile $PROFILE --prepare' ;;
        [0-9][0-9]) echo "python3 -m paper_lib.reproduce --profile $PROFILE --only $1" \
                         "--no-scoreboard" ;;
        *) return 1 ;;
    esac
}

run_stages() {  # the background runner
    setup_env
    cd "$REPO" || exit 1
    for s in "$@"; do
        local t0=$SECONDS rc
        echo "== $s: $(stage_cmd "$s")" > "$WORK/logs/$s.log"
        bash -c "$(stage_cmd "$s")" >> "$WORK/logs/$s.log" 2>&1
        rc=$?
        printf '%s\t%s\t%s\n' "$s" "$rc" "$((SECONDS - t0))" >> "$WORK/status.tsv"
        if [ "$s" = env ] && [ "$rc" != 0 ]; then break; fi
    done
    touch "$WORK/done"
}

collect() {
    [ -n "${OUT:-}" ] || { echo "OUT is not set: run this through the device tool"; return 1; }
    cp "$WORK/status.tsv" "$OUT/" 2>/dev/null
    tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
    (cd "$REPO" && tar -czf "$OUT/results.tgz" --ignore-failed-read \
        "results/$PROFILE" "figures/$PROFILE" results/bench "build/$PROFILE" 2>/dev/null)
    echo "--- status (stage, exit code, seconds)"; cat "$WORK/status.tsv" 2>/dev/null
    [ -e "$WORK/done" ] && echo "--- all stages ended" || echo "--- still running: call wait"
    for f in "$WORK"/logs/*.log; do echo "--- tail of $f"; tail -n 15 "$f"; done
}

wait_runner() {
    if [ ! -e "$WORK/pid" ]; then
        echo "no runner on this machine (a fresh one: the last went back?): start again" \
             "with the stages not yet done"
        return 2
    fi
    local t0=$SECONDS
    while [ ! -e "$WORK/done" ] && [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do sleep 5; done
    collect
}

resolve_stages() {  # a plan name (default kernels) or stage names -> $stages, or exit 2
    stages=${*:-kernels}
    if [ $# -le 1 ] && plan_stages "$stages" > /dev/null; then
        stages=$(plan_stages "$stages")
    fi
    for s in $stages; do
        stage_cmd "$s" > /dev/null \
            || { echo "unknown plan or stage '$s' (see the header)"; exit 2; }
    done
}

case ${1:-} in
    plan)  # what `start` would run, without running it (no device time)
        shift
        resolve_stages "$@"
        for s in $stages; do echo "$s: $(stage_cmd "$s" | tr "\n" " ")"; done ;;
    start)
        shift
        resolve_stages "$@"
        ls .whl/*.whl > /dev/null 2>&1 \
            || { echo "no .whl/: run make device-wheels here and carry .whl"; exit 2; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        if [ -e "$WORK/pid" ] && kill -0 "$(cat "$WORK/pid")" 2>/dev/null; then
            echo "a runner is still going: call wait"; exit 2
        fi
        rm -rf "$WORK/logs" "$WORK/status.tsv" "$WORK/done"
        mkdir -p "$WORK/logs" "$REPO"
        # the tree as sent, data/ caches of an earlier start on this machine kept
        tar -cf - --exclude=./.whl --exclude=./data . | tar -xf - -C "$REPO"
        setsid nohup "$REPO/.ci/gpu_session.sh" run-stages $stages \
            > "$WORK/runner.log" 2>&1 < /dev/null &
        echo $! > "$WORK/pid"
        echo "started: $stages"
        wait_runner ;;
    wait) wait_runner ;;
    run-stages) shift; run_stages "$@" ;;
    *) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 2 ;;  # the header above
esac
