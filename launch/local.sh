#!/usr/bin/env bash
# Runs N training processes on this machine over localhost, each with K fake CPU devices: one mesh over N*K
# devices, the same multi-process code path (jax.distributed, per-process data feeding, pod-safe stop,
# multi-host checkpoints) as a TPU pod or a GPU cluster.
#
#   bash launch/local.sh 2 --devices-per-process 4 --config configs/demo.py --workdir /tmp/siim_mp \
#       --config.mesh.fsdp=2
#
# --module runs another entry point the same way (the evaluation commands take the trainer's flags):
#   bash launch/local.sh 2 --devices-per-process 4 --module siim_jax.linear_probe --config configs/linprobe_demo.py \
#       --pretrained /tmp/siim_mp --workdir /tmp/siim_mp_linprobe
#
# SIGTERM / SIGINT to this script go to every process (they stop after the same step and save it). When one
# process fails, the others are stopped. Exit status: 0 all finished, 75 stopped and resumable (rerun the same
# command), otherwise the status of the first process that failed (processes are checked every 0.2 s; of several
# found gone together, JAX's abort of a process that lost its coordinator, 134, comes after any other failure).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/local.sh N [--devices-per-process K] [--port P] [--module M] [train flags...]

Starts N processes of `python -m M [train flags...]` on this machine (M: siim_jax.train by default, or
siim_jax.linear_probe / siim_jax.finetune / siim_jax.fewshot), joined over localhost:P (default: a free
port), each with K fake CPU devices (default 1).
Exit status: 0 finished, 75 stopped on request (resumable), else the first failing process's status.
EOF
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  [[ $# -ge 1 ]] && exit 0
  exit 2
fi
if ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: error: N must be a positive integer, got '$1'" >&2
  exit 2
fi
processes="$1"
shift
devices=1
port=""
module=siim_jax.train
train_flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices-per-process) devices="${2:-}"; shift 2 || { echo "launch/local.sh: error: $1 needs a value" >&2; exit 2; } ;;
    --devices-per-process=*) devices="${1#*=}"; shift ;;
    --port) port="${2:-}"; shift 2 || { echo "launch/local.sh: error: --port needs a value" >&2; exit 2; } ;;
    --port=*) port="${1#*=}"; shift ;;
    --module) module="${2:-}"; shift 2 || { echo "launch/local.sh: error: --module needs a value" >&2; exit 2; } ;;
    --module=*) module="${1#*=}"; shift ;;
    *) train_flags+=("$1"); shift ;;
  esac
done
if ! [[ "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: error: --devices-per-process must be a positive integer, got '$devices'" >&2
  exit 2
fi
python="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi

pids=()
forward() {  # a stop request reaches every process
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < processes; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
    "$python" -m "$module" "${train_flags[@]}" --coordinator_address "localhost:${port}" \
    --num_processes "$processes" --process_id "$i" &
  pids+=("$!")
done

declare -A alive=() index=() code=()
for i in "${!pids[@]}"; do alive[${pids[$i]}]=1; index[${pids[$i]}]=$i; done
describe() {  # how a process ended, from its exit status
  if [[ $1 -gt 128 ]]; then
    echo "was killed by $(kill -l $(($1 - 128)) 2>/dev/null || echo "signal $(($1 - 128))") (status $1)"
  else
    echo "exited with status $1"
  fi
}
status=0
while [[ ${#alive[@]} -gt 0 ]]; do
  # polled, not `wait -n`: a process found gone (bash has reaped it: kill -0 fails) gives its status to
  # `wait PID`; nothing here can block on a process that already ended, and signals are forwarded within 0.2 s
  gone=()
  for pid in "${pids[@]}"; do  # in process order
    if [[ -n ${alive[$pid]:-} ]] && ! kill -0 "$pid" 2> /dev/null; then gone+=("$pid"); fi
  done
  if [[ ${#gone[@]} -eq 0 ]]; then
    sleep 0.2
    continue
  fi
  code=()
  for pid in "${gone[@]}"; do
    code[$pid]=0
    wait "$pid" || code[$pid]=$?
    unset "alive[$pid]"
  done
  # several gone in one poll: when one process dies, JAX aborts the others within milliseconds (SIGABRT, status
  # 134, when the coordinator is lost), so an abort counts as the first failure only when nothing else failed
  ordered=()
  for pid in "${gone[@]}"; do if [[ ${code[$pid]} -ne 134 ]]; then ordered+=("$pid"); fi; done
  for pid in "${gone[@]}"; do if [[ ${code[$pid]} -eq 134 ]]; then ordered+=("$pid"); fi; done
  for pid in "${ordered[@]}"; do
    c=${code[$pid]}
    if [[ $c -ne 0 && $c -ne 75 && ( $status -eq 0 || $status -eq 75 ) ]]; then
      status=$c
      echo "launch/local.sh: error: process ${index[$pid]}/$processes (pid $pid) $(describe "$c"); stopping the others (SIGKILL in 10 s)" >&2
      (sleep 10; forward KILL) &  # they may be exiting on the same error; a hung collective would never end
    elif [[ $c -eq 75 && $status -eq 0 ]]; then
      status=75
    fi
  done
done
exit "$status"
