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
# mpirun does not forward the environment to other nodes by itself: the rendezvous port, the paths, NCCL's,
# CUDA's, torch's and ours. Not CUDA_VISIBLE_DEVICES: each node's own (Slurm sets it per node).
while IFS= read -r var; do
    case $var in
        CUDA_VISIBLE_DEVICES) ;;
        MASTER_PORT | PATH | PYTHONPATH | LD_LIBRARY_PATH | OMP_NUM_THREADS | NCCL_* | CUDA_* | TORCH_* | EARLYBERT_*)
            args+=(-x "$var") ;;
    esac
done < <(compgen -e)
# shellcheck disable=SC2086  # MPI_ARGS is a list of options
exec mpirun "${args[@]}" ${MPI_ARGS:-} "${PYTHON:-python}" -m "${MODULE:-pipeline.train}" --config "$config" "$@"
