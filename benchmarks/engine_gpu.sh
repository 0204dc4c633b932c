#!/usr/bin/env bash
# Engine benchmarks on the GPU machine, one named step after another, each under its own timeout; every result
# is one JSON line, printed and appended to $OUT/results.jsonl the moment it is measured; every step's stderr goes
# to $OUT/steps.err, after a line naming the step (one file for all: the device tool returns only a few files).
#   bash benchmarks/engine_gpu.sh parity 1b 1b-sync 1b-k8 hf-compiled ragged ragged-k8 hf-ragged profile profile-k8 \
#     profile-prefill 8b 1b-k8-roof 1b-k8-warm serve-1b-k8
# (-kN: --num-scheduler-steps N; 1b-kN-roof: with the roofline measured first; 1b-kN-unfused: 1b-kN without the
# projection fusion (benchmarks/unfused.py, the A/B baseline; ragged-kN-unfused likewise); 1b-kN-warm: 1b-kN
# again, with its own log, for a second start on the same machine (serve-1b-kN-warm likewise; both servers append to
# $OUT/server.log); profile-kN: 20 warm-up steps (the
# prefills) then 10 profiled multi-steps; serve-1b-kN: benchmarks/serving.py --launch with the throughput run's
# engine shape, reporting the seconds to /health 200, the server run through timed_server.py for a timed log;
# serve-8b-kN: the same with Llama-3.1-8B; serve-ragged-1b-kN: nano-vllm's ragged workload against a server that
# compiled everything before ready, all at once and then at 80 % of that request throughput; decode-kN-bB: the
# bare decode step of B sequences on that server's engine shape, 10 steps timed without the profiler (each
# program's dispatch timed too) then 10 under it; decode-kN-bB-host: then 8 more steps under cProfile, the
# functions with most self time per step; decode-kN-bB[-host]-while: the same with XLA's while loops in CUDA graphs
# too (--xla_gpu_enable_command_buffer=+WHILE: the multi-step decode's loop becomes one graph launch); -wp after
# 1b-kN or ragged-kN: with --multi-step-with-prefill (the servers' default); -nowp after serve-ragged-1b-kN: the
# server with --no-multi-step-with-prefill; timeline-kN: the 1b-kN workload untraced, step by step, where its wall
# time goes; cmdbuf-kN-bB: decode-kN-bB under XLA's command-buffer VLOG, then how many
# command-buffer launches re-recorded their graph, in all and per untraced step: benchmarks/command_buffers.py;
# the log's last 600 command-buffer lines are kept in $OUT/cmdbuf-kN-bB.vlog.tail)
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/benchmarks/device_setup.sh" >/dev/null
export OUT=${OUT:-/tmp/out} JAXPAGED_CACHE_DIR=${JAXPAGED_CACHE_DIR:-/tmp/jaxpaged-xla} TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
mkdir -p "$OUT"
T="python3 $root/benchmarks/throughput.py"
FIXED="--num-prompts 256 --input-len 512 --output-len 128 --max-model-len 1024"
RAGGED="--dataset nano-vllm --max-model-len 2048"
SHAPE="--max-num-seqs 256 --max-num-batched-tokens 8192"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$OUT/steps.err"
  timeout "$limit" "$@" 2>>"$OUT/steps.err" | tee -a "$OUT/results.jsonl"
  echo "=== $name rc=${PIPESTATUS[0]} ($(date -u +%H:%M:%S))"
  tail -3 "$OUT/steps.err"
}

for s in "$@"; do
  case $s in
    parity) step parity 240 python3 "$root/benchmarks/engine_parity.py" ;;
    1b) step 1b 300 $T $FIXED ;;
    1b-sync) step 1b-sync 240 $T $FIXED --no-async-scheduling --no-roofline ;;
    1b-k*-roof) k=${s#1b-k}; step "$s" 300 $T $FIXED --num-scheduler-steps "${k%-roof}" ;;
    1b-k*-warm) k=${s#1b-k}; step "$s" 240 $T $FIXED --num-scheduler-steps "${k%-warm}" --no-roofline ;;
    1b-k*-unfused) k=${s#1b-k}; step "$s" 240 python3 "$root/benchmarks/unfused.py" $FIXED \
      --num-scheduler-steps "${k%-unfused}" --no-roofline ;;
    1b-k*-wp) k=${s#1b-k}; step "$s" 240 $T $FIXED --num-scheduler-steps "${k%-wp}" --multi-step-with-prefill \
      --no-roofline ;;
    1b-k*) step "$s" 240 $T $FIXED --num-scheduler-steps "${s#1b-k}" --no-roofline ;;
    ragged-k*-unfused) k=${s#ragged-k}; step "$s" 300 python3 "$root/benchmarks/unfused.py" $RAGGED \
      --num-scheduler-steps "${k%-unfused}" --no-roofline ;;
    ragged-k*) k=${s#ragged-k}; wp=; [ "${k%-wp}" != "$k" ] && wp=--multi-step-with-prefill && k=${k%-wp}
      step "$s" 300 $T $RAGGED --num-scheduler-steps "$k" $wp --no-roofline ;;
    timeline-k*) step "$s" 240 python3 "$root/benchmarks/step_profile.py" $FIXED --num-scheduler-steps "${s#timeline-k}" \
      --timeline ;;
    profile-k*) step "$s" 300 python3 "$root/benchmarks/step_profile.py" $FIXED --num-scheduler-steps "${s#profile-k}" \
      --warmup-steps 20 --profile-steps 10 ;;
    serve-1b-k*|serve-8b-k*) k=${s#serve-?b-k}; k=${k%-warm}; size=${s#serve-}; size=${size%%-*}
      [ "$size" = 8b ] && model=llama-3.1-8b || model=llama-3.2-1b
      step "$s" 240 python3 "$root/benchmarks/serving.py" --launch "--model $model --load-format dummy \
      --dtype bfloat16 --max-model-len 1024 --max-num-seqs 256 --max-num-batched-tokens 8192 \
      --num-scheduler-steps $k --uvicorn-log-level warning" --num-prompts 200 --request-rate 64 \
      --random-input-len 512 --random-output-len 128 --ready-timeout 200 --timed-server ;;
    serve-ragged-1b-k*) k=${s#serve-ragged-1b-k}; wp=
      [ "${k%-nowp}" != "$k" ] && wp=--no-multi-step-with-prefill && k=${k%-nowp}
      step "$s" 420 python3 "$root/benchmarks/serving.py" --launch "--model llama-3.2-1b \
      --load-format dummy --dtype bfloat16 --max-model-len 2048 $SHAPE --num-scheduler-steps $k $wp \
      --compile-all-before-ready --uvicorn-log-level warning" --dataset nano-vllm --num-prompts 512 \
      --rate-fraction 0.8 --ready-timeout 300 --timed-server ;;
    decode-k*-b*) k=${s#decode-k}; host=; xla=${XLA_FLAGS:-}
      [ "${k%-while}" != "$k" ] && k=${k%-while} && xla="$xla --xla_gpu_enable_command_buffer=+WHILE"
      [ "${k%-host}" != "$k" ] && host="--host-profile-steps 8" && k=${k%-host}
      step "$s" 300 env XLA_FLAGS="$xla" python3 "$root/benchmarks/step_profile.py" --num-prompts "${k#*-b}" \
      --input-len 562 --output-len 512 --max-model-len 2048 $SHAPE --num-scheduler-steps "${k%-b*}" \
      --warmup-steps 24 --profile-steps 10 $host ;;
    cmdbuf-k*-b*) k=${s#cmdbuf-k}; log=$OUT/$s.vlog
      TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 timeout 300 python3 \
        "$root/benchmarks/step_profile.py" --num-prompts "${k#*-b}" --input-len 562 --output-len 512 \
        --max-model-len 2048 $SHAPE --num-scheduler-steps "${k%-b*}" --warmup-steps 24 --profile-steps 4 \
        --mark-steps 2>"$log" >/dev/null
      step "$s" 60 python3 "$root/benchmarks/command_buffers.py" "$log"
      grep -a -i -e "command buffer" -e "step_profile:" "$log" | tail -n 600 >"$log.tail"; rm -f "$log" ;;
    hf) step hf 300 $T $FIXED --engine hf --hf-batch-size 256 --no-roofline ;;
    hf-compiled) step hf-compiled 420 $T $FIXED --engine hf-compiled --hf-batch-size 256 --no-roofline ;;
    ragged) step ragged 300 $T $RAGGED ;;
    hf-ragged) step hf-ragged 300 $T $RAGGED --engine hf --hf-batch-size 256 --hf-max-requests 256 --no-roofline ;;
    profile) step profile 300 python3 "$root/benchmarks/step_profile.py" $FIXED ;;
    profile-prefill) step profile-prefill 300 python3 "$root/benchmarks/step_profile.py" $FIXED --warmup-steps 0 \
      --profile-steps 16 ;;
    8b) step 8b 420 $T --model llama-3.1-8b $FIXED ;;
    *) echo "unknown step $s" ;;
  esac
done
