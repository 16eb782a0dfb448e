#!/usr/bin/env bash
# Trains vdm-jax on SLURM GPU nodes: one JAX process per GPU (docs/scaling.md).
#
#   CONFIG=configs/ucf101_64.py WORKDIR=/shared/runs/ucf101_64 \
#   sbatch --nodes=4 experiments/launch_slurm.sh \
#       [--config.training.batch_size=256 ...]
#
# Extra arguments are passed on to vdm_jax.main. `srun` starts the same
# command in every task; jax.distributed.initialize() reads the SLURM
# variables (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID) and needs no coordinator flags: task 0's node is the
# coordinator and each task drives the GPU whose index is its SLURM_LOCALID.
# All tasks therefore see all of their node's GPUs: do not bind GPUs to tasks
# (no --gpus-per-task or --gpu-bind), or each task would see one GPU, numbered
# 0, and all but the first task of a node would ask for one it cannot see.
#
# One process per node driving all of its GPUs also works: submit with
# --ntasks-per-node=1; the script then sets JAX_LOCAL_DEVICE_IDS to every GPU
# of the node, which JAX uses instead of SLURM_LOCALID.
#
# Preemption and time limits: --signal=TERM@300 makes SLURM send SIGTERM to
# every task 5 minutes before the end; vdm_jax.train saves a checkpoint at the
# end of the current step and exits. With --requeue (or a new sbatch on the
# same WORKDIR) the run resumes from that checkpoint.
#
# Variables (set in the environment of sbatch; defaults in brackets):
#   CONFIG        config file (with optional :arg) [configs/ucf101_64.py].
#   WORKDIR       checkpoints, logs and samples; must be on a file system
#                 that every node sees (or gs://) (required).
#   MODE          train | sample | eval [train].
#   REPO_DIR      the vdm-jax checkout, on the shared file system
#                 [the directory sbatch was run from].
#   VENV          its virtual environment, created with
#                 `pip install "jax[cuda12]==0.10.2"` and
#                 `pip install -r requirements.txt -e .` [REPO_DIR/.venv].
#   GPUS_PER_NODE GPUs of each node, for --ntasks-per-node=1 [8].
#   PLAN_GPU      plan first (docs/scaling.md "Plan first"): the GPU of the
#                 nodes, h100, h200, a100_80 or a100_40 [empty: no plan].
#                 The train step is compiled for gpu:PLAN_GPU:NODESxGPUS_PER_NODE
#                 on the CPU (needs requirements-plan.txt in VENV) and the
#                 job stops (exit 3) if the config does not fit. Run outside
#                 SLURM with NODES=N to plan without submitting:
#                   PLAN_GPU=h100 NODES=4 CONFIG=... WORKDIR=... \
#                     experiments/launch_slurm.sh [args]
#
#SBATCH --job-name=vdm-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG="${CONFIG:-configs/ucf101_64.py}"
WORKDIR="${WORKDIR:?set WORKDIR, a directory that every node can reach}"
MODE="${MODE:-train}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
VENV="${VENV:-${REPO_DIR}/.venv}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"

PLAN_GPU="${PLAN_GPU:-}"

if [[ -z "${SLURM_JOB_ID:-}" && -z "${PLAN_GPU}" ]]; then
  echo "Submit with sbatch (or run inside an salloc allocation)." >&2
  exit 2
fi
if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "No virtual environment at ${VENV}; see the VENV note above." >&2
  exit 2
fi

if [[ -n "${PLAN_GPU}" ]]; then
  nodes="${SLURM_JOB_NUM_NODES:-${NODES:?set NODES, the number of nodes}}"
  plan_dir="$(mktemp -d -t vdm_jax_plan.XXXXXX)"
  target="gpu:${PLAN_GPU}:${nodes}x${GPUS_PER_NODE}"
  echo "Planning ${CONFIG} for ${target} (compiles for minutes)." >&2
  (cd "${REPO_DIR}" && "${VENV}/bin/python" -m vdm_jax.main \
    --config="${CONFIG}" --mode=plan --workdir="${plan_dir}" \
    --config.plan.targets="${target}" --config.plan.sample=False "$@")
  if ! "${VENV}/bin/python" -c 'import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
sys.exit(0 if all(r["fits"] for r in rows if "fits" in r) else 1)' \
      "${plan_dir}/plan.jsonl"; then
    echo "${CONFIG} does not fit ${target} (${plan_dir}/plan.md); not" \
      "training. See docs/scaling.md for what to change." >&2
    exit 3
  fi
  echo "The plan fits (${plan_dir}/plan.md)." >&2
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    exit 0
  fi
fi

tasks_per_node="${SLURM_NTASKS_PER_NODE:-}"
if [[ -z "${tasks_per_node}" ]]; then
  tasks_per_node=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))
fi
if [[ "${tasks_per_node}" == 1 ]]; then
  # One process per node: it drives every GPU of its node.
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi
echo "Job ${SLURM_JOB_ID}: ${SLURM_JOB_NUM_NODES} nodes x ${tasks_per_node}" \
  "tasks; ${MODE} ${CONFIG} in ${WORKDIR}" >&2
cd "${REPO_DIR}"
srun --kill-on-bad-exit=1 --cpu-bind=none \
  "${VENV}/bin/python" -m vdm_jax.main --config="${CONFIG}" \
  --workdir="${WORKDIR}" --mode="${MODE}" "$@"
