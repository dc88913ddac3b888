#!/usr/bin/env bash
# `earlybert train` under mpirun (OpenMPI syntax): the ranks are found through mpi4py
# (DeepSpeed's MPI discovery); rank 0's address is the rendezvous, MASTER_PORT its port.
#
#   NP=2 launch/mpirun.sh CONFIG [key=value ...]
#   NP=16 MPI_ARGS="--hostfile hosts --map-by ppr:8:node" launch/mpirun.sh launch/configs/bert-large.yaml
#   MODULE=pipeline.finetune NP=2 launch/mpirun.sh launch/configs/finetune-sst2.yaml      # fine-tuning
#
# Exit status 75: the run checkpointed after SIGTERM/SIGUSR1; the same command resumes it.
set -euo pipefail
config=${1:?usage: launch/mpirun.sh CONFIG [key=value ...]}
shift

export MASTER_PORT=${MASTER_PORT:-29500}
args=(-np "${NP:-2}")
if [[ $(id -u) -eq 0 ]]; then args+=(--allow-run-as-root); fi
# mpirun does not forward the environment to other nodes by itself.
for var in MASTER_PORT PATH PYTHONPATH TORCH_EXTENSIONS_DIR OMP_NUM_THREADS; do
    if [[ -n "${!var:-}" ]]; then args+=(-x "$var"); fi
done
# shellcheck disable=SC2086  # MPI_ARGS is a list of options
exec mpirun "${args[@]}" ${MPI_ARGS:-} "${PYTHON:-python}" -m "${MODULE:-pipeline.train}" --config "$config" "$@"
