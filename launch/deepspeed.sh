#!/usr/bin/env bash
# `earlybert train` under the deepspeed launcher: one node, or several through a hostfile (pdsh/ssh).
#
#   launch/deepspeed.sh CONFIG [key=value ...]                   every GPU of this node (1 process on a CPU)
#   NUM_GPUS=4 launch/deepspeed.sh launch/configs/bert-base.yaml
#   HOSTFILE=hosts MASTER_ADDR=node01 launch/deepspeed.sh launch/configs/bert-large.yaml
#       hosts: one line per node, "node01 slots=8"
#
# Exit status 75: the run checkpointed after SIGTERM/SIGUSR1; the same command resumes it.
set -euo pipefail
config=${1:?usage: launch/deepspeed.sh CONFIG [key=value ...]}
shift

args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first host of $HOSTFILE}")
else
    gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    args+=(--num_gpus "${NUM_GPUS:-$(( gpus > 0 ? gpus : 1 ))}")
fi
exec "${DEEPSPEED:-deepspeed}" "${args[@]}" --module pipeline.train --config "$config" "$@"
