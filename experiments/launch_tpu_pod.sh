#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, installs vdm-jax on every worker and runs the
# same vdm_jax.main command on all of them (docs/scaling.md).
#
#   TPU_NAME=vdm-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   CONFIG=configs/ucf101_64.py WORKDIR=gs://BUCKET/ucf101_64 \
#   experiments/launch_tpu_pod.sh [--config.training.batch_size=256 ...]
#
# Extra arguments are passed on to vdm_jax.main. Every worker runs the same
# command; JAX finds the other workers through the TPU metadata server
# (jax.distributed.initialize() auto-detection), so no coordinator flags are
# needed. Running the script again on the same WORKDIR resumes training from
# the last checkpoint, e.g. after a spot slice was preempted and recreated.
#
# Variables (set in the environment; defaults in brackets):
#   TPU_NAME          name of the TPU VM slice; created if it does not exist.
#   ZONE              GCP zone with quota for ACCELERATOR_TYPE.
#   PROJECT           GCP project [gcloud's configured project].
#   ACCELERATOR_TYPE  slice type, e.g. v4-32 (16 chips, 4 workers),
#                     v5litepod-16, v5p-64 [v4-32].
#   RUNTIME_VERSION   TPU VM software version [from ACCELERATOR_TYPE:
#                     v2-alpha-tpuv6e, v2-alpha-tpuv5, v2-alpha-tpuv5-lite,
#                     else tpu-ubuntu2204-base].
#   PYTHON            interpreter for the venv; the pinned numpy and jax need
#                     Python >= 3.11, installed with apt when missing
#                     [python3.11].
#   SPOT              1: create a spot (preemptible) slice [0].
#   REPO_URL          git URL cloned on every worker; empty: this checkout's
#                     files that git does not ignore (uncommitted edits
#                     included) are copied over instead [empty].
#   REPO_REF          branch, tag or commit of REPO_URL [main].
#   REMOTE_DIR        directory on the workers [vdm-jax].
#   JAX_VERSION       jax[tpu] version; must match requirements.txt [0.10.2].
#   CONFIG            config file (with optional :arg) [configs/ucf101_64.py].
#   WORKDIR           checkpoints, logs and samples; a gs:// path, since every
#                     worker must see the same directory (required).
#   MODE              train | sample | eval [train].
#   STAGES            which stages to run, in order: plan create install
#                     run ["create install run"]. `plan` compiles the train
#                     step for tpu:ACCELERATOR_TYPE on this machine (no TPU
#                     needed; `pip install -r requirements-plan.txt` in
#                     PLAN_PYTHON's venv, docs/scaling.md "Plan first") and
#                     stops before `create` if CONFIG (with the arguments)
#                     does not fit the slice.
#   PLAN_PYTHON       interpreter of the plan stage [ROOT/.venv/bin/python].
#   DETACH            1: start the run in the background on every worker
#                     (log in ~/vdm_jax_<MODE>.log) and return [0].
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME, the name of the TPU VM slice}"
ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
case "${ACCELERATOR_TYPE}" in
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-${default_runtime}}"
PYTHON="${PYTHON:-python3.11}"
SPOT="${SPOT:-0}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-vdm-jax}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
CONFIG="${CONFIG:-configs/ucf101_64.py}"
WORKDIR="${WORKDIR:?set WORKDIR, a gs:// path that every worker can reach}"
MODE="${MODE:-train}"
STAGES="${STAGES:-create install run}"
DETACH="${DETACH:-0}"
PLAN_PYTHON="${PLAN_PYTHON:-}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLAN_PYTHON="${PLAN_PYTHON:-${ROOT}/.venv/bin/python}"
GCLOUD_FLAGS=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  GCLOUD_FLAGS+=(--project="${PROJECT}")
fi

log() { echo "[launch_tpu_pod] $*" >&2; }

# Runs a command on every worker of the slice, all at once.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
    --worker=all --command="$1"
}

# Compiles the run's train step for the slice here; exits 3 if it does not
# fit (the table and JSON lines stay in a temporary directory).
plan() {
  local dir
  dir="$(mktemp -d -t vdm_jax_plan.XXXXXX)"
  log "Planning ${CONFIG} for tpu:${ACCELERATOR_TYPE} (compiles for minutes)."
  (cd "${ROOT}" && "${PLAN_PYTHON}" -m vdm_jax.main --config="${CONFIG}" \
    --mode=plan --workdir="${dir}" \
    --config.plan.targets="tpu:${ACCELERATOR_TYPE}" \
    --config.plan.sample=False "$@")
  if ! "${PLAN_PYTHON}" -c 'import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
sys.exit(0 if all(r["fits"] for r in rows if "fits" in r) else 1)' \
      "${dir}/plan.jsonl"; then
    log "${CONFIG} does not fit ${ACCELERATOR_TYPE} (${dir}/plan.md):" \
      "not creating the slice. See docs/scaling.md for what to change."
    exit 3
  fi
  log "The plan fits (${dir}/plan.md)."
}

create() {
  if gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
      >/dev/null 2>&1; then
    log "TPU ${TPU_NAME} exists; not creating it."
    return
  fi
  local extra=()
  if [[ "${SPOT}" == 1 ]]; then
    extra+=(--spot)
  fi
  log "Creating ${ACCELERATOR_TYPE} slice ${TPU_NAME} in ${ZONE}."
  gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" \
    --version="${RUNTIME_VERSION}" "${extra[@]}"
}

install() {
  if [[ -n "${REPO_URL}" ]]; then
    log "Cloning ${REPO_URL}@${REPO_REF} on every worker."
    on_all_workers "set -e
      if [ ! -d ${REMOTE_DIR}/.git ]; then
        git clone ${REPO_URL} ${REMOTE_DIR}
      fi
      git -C ${REMOTE_DIR} fetch --all --tags
      git -C ${REMOTE_DIR} checkout ${REPO_REF}
      git -C ${REMOTE_DIR} pull --ff-only || true"
  else
    local tarball
    tarball="$(mktemp -t vdm_jax.XXXXXX.tar.gz)"
    log "Copying the files of ${ROOT} that git does not ignore to every worker."
    (cd "${ROOT}" && git ls-files -z --cached --others --exclude-standard |
      tar -czf "${tarball}" --null -T -)
    gcloud compute tpus tpu-vm scp "${tarball}" \
      "${TPU_NAME}:vdm_jax_src.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
    rm -f "${tarball}"
    on_all_workers "set -e; mkdir -p ${REMOTE_DIR}
      tar -xzf vdm_jax_src.tar.gz -C ${REMOTE_DIR}"
  fi
  log "Installing jax[tpu]==${JAX_VERSION} and requirements on every worker."
  on_all_workers "set -e; cd ${REMOTE_DIR}
    if ! command -v ${PYTHON} > /dev/null; then
      sudo apt-get update -q
      sudo apt-get install -y -q ${PYTHON} ${PYTHON}-venv
    fi
    ${PYTHON} -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q 'jax[tpu]==${JAX_VERSION}'
    .venv/bin/pip install -q -r requirements.txt -e .
    .venv/bin/python -c 'import jax; print(jax.process_index(), jax.devices())'"
}

run() {
  # Quoted once here so that arguments with spaces survive the remote shell.
  local args
  args="$(printf ' %q' --config="${CONFIG}" --workdir="${WORKDIR}" \
    --mode="${MODE}" "$@")"
  local cmd="cd ${REMOTE_DIR} && .venv/bin/python -m vdm_jax.main${args}"
  if [[ "${DETACH}" == 1 ]]; then
    log "Starting ${MODE} in the background; logs: ~/vdm_jax_${MODE}.log."
    on_all_workers "nohup bash -c $(printf '%q' "${cmd}") \
      > ~/vdm_jax_${MODE}.log 2>&1 < /dev/null &"
  else
    log "Running ${MODE} on every worker: ${cmd}"
    on_all_workers "${cmd}"
  fi
}

for stage in ${STAGES}; do
  case "${stage}" in
    plan) plan "$@" ;;
    create) create ;;
    install) install ;;
    run) run "$@" ;;
    *) log "Unknown stage ${stage}; use plan, create, install and/or run."; exit 2 ;;
  esac
done
