#!/usr/bin/env bash
# `earlybert train` under the deepspeed launcher: one node, or several through a hostfile (pdsh/ssh).
#
#   launch/deepspeed.sh CONFIG [key=value ...]                   every GPU this job sees (1 process on a CPU)
#   NUM_GPUS=4 launch/deepspeed.sh launch/configs/bert-base.yaml
#   HOSTFILE=hosts MASTER_ADDR=node01 launch/deepspeed.sh launch/configs/bert-large.yaml
#       hosts: one line per node, "node01 slots=8"
#
# One node: the GPUs of CUDA_VISIBLE_DEVICES when it is set (a Slurm job's, or those left to this job on a
# shared node; NUM_GPUS takes the first N of them), else every GPU of the node. Passing --num_gpus would make
# the launcher ignore CUDA_VISIBLE_DEVICES and take devices 0..N-1, another job's perhaps.
# Inside a Slurm allocation of several nodes (sbatch/salloc --nodes=N, no HOSTFILE): every node of it, with
# NUM_GPUS, else SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE ranks each, the first node as master. pdsh
# starts them over ssh, outside Slurm's job: each node's devices 0..slots-1, so allocate whole nodes
# (--exclusive); where ssh between nodes is not allowed, use launch/slurm.sbatch (srun tasks).
#
# Exit status 75: the run checkpointed after SIGTERM/SIGUSR1; the same command resumes it.
set -euo pipefail
config=${1:?usage: launch/deepspeed.sh CONFIG [key=value ...]}
shift

args=(--master_port "${MASTER_PORT:-29500}")
if [[ -z "${HOSTFILE:-}" && "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]]; then
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    slots=${NUM_GPUS:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
    # The hostfile is read through a descriptor of a file already deleted: exec below keeps the launcher's
    # signals and exit status, and nothing is left behind.
    tmp=$(mktemp "${TMPDIR:-/tmp}/earlybert-hosts.XXXXXX")
    sed "s/\$/ slots=$slots/" <<<"$hosts" >"$tmp"
    exec 3<"$tmp"
    rm -f "$tmp"
    HOSTFILE=/dev/fd/3
    MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 <<<"$hosts")}
    echo "earlybert: Slurm job ${SLURM_JOB_ID:-?}: $slots ranks on each of $(wc -l <<<"$hosts") nodes" \
         "($(paste -sd, - <<<"$hosts")), master $MASTER_ADDR" >&2
fi
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first host of $HOSTFILE}")
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    if [[ -n "${NUM_GPUS:-}" ]]; then
        CUDA_VISIBLE_DEVICES=$(cut -d, -f "1-$NUM_GPUS" <<<"$CUDA_VISIBLE_DEVICES")
        export CUDA_VISIBLE_DEVICES
    fi
else
    gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    args+=(--num_gpus "${NUM_GPUS:-$(( gpus > 0 ? gpus : 1 ))}")
fi
exec "${DEEPSPEED:-deepspeed}" "${args[@]}" --module pipeline.train --config "$config" "$@"
