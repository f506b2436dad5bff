#!/usr/bin/env bash
# One GPU-machine session in as few device calls as possible (see README, "GPU runs").
#
# Here:  make device-wheels      # .whl/: what the machine's image lacks (about 20 MiB)
# There (device tool `run`, carry [".whl"], one call at most 10 minutes):
#   PAPER_LIB_GIT=<commit> .ci/gpu_session.sh start [STAGE ...]   # first call
#   .ci/gpu_session.sh wait                                         # each later call
#
# `start` installs the wheels, copies the tree to /tmp/gpu/repo (later calls re-sync the
# tree the tool sends; the runner's results must not be overwritten) and starts the stages
# in the background, in their own process session so they outlive the call. Each call
# then waits up to WAIT_S seconds (default 540) and copies what is done into $OUT:
# status.tsv (stage, exit code, seconds), logs.tgz, results.tgz (results/gpu,
# figures/gpu, results/bench and the executed notebooks in build/gpu of the runner's copy;
# the executed notebooks are committed as results/gpu/<notebook>.ipynb). The machine
# goes back after 30 s without a call, and the stages with it, so issue `wait` calls back
# to back; after a loss, `start` again with the stages not yet done.
#
# Stages (default: all, in this order; a failing stage is recorded and the rest go on,
# except env, which stops the session):
#   env      driver, versions, every import the later stages need
#   tests    the CUDA tests (test_kernels, test_fused, test_bench_gpu, test_train)
#   bench    python -m paper_lib.bench (TopK-family steps, eai-sparsify, harvest, profile;
#            the log shows the Triton autotuner's picks and full compiler tracebacks)
#   prepare  the gpu profile's LM and shared activations (reproduce --prepare)
#   NN       notebook NN at the gpu profile (reproduce --profile gpu --only NN)
set -uo pipefail

WORK=${GPU_WORK:-/tmp/gpu}
REPO=$WORK/repo
WAIT_S=${WAIT_S:-540}
PROFILE=${PROFILE:-gpu}  # smoke: try this script on a CPU machine
DEFAULT_STAGES="env tests bench prepare 01 05 04 03 02"  # the open measurements first

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
        tests) echo 'python3 -m pytest -q -rs tests/test_kernels.py tests/test_fused.py' \
                    'tests/test_bench_gpu.py tests/test_train.py' ;;
        bench) echo 'TORCHDYNAMO_VERBOSE=1 TRITON_PRINT_AUTOTUNING=1 python3 -m paper_lib.bench' ;;
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

case ${1:-} in
    start)
        shift
        stages=${*:-$DEFAULT_STAGES}
        for s in $stages; do
            stage_cmd "$s" > /dev/null || { echo "unknown stage '$s' (see the header)"; exit 2; }
        done
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
