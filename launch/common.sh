# shellcheck shell=bash
# Shared helpers for the launch scripts (sourced, not run).
#
# Every script accepts --dry-run: it then prints the exact commands, one per line, instead of
# running them. Settings come from flags or the environment: PROJECT, ZONE, TPU_NAME,
# ACCELERATOR_TYPE, RUNTIME_VERSION, NUM_SLICES.

set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
NUM_SLICES=${NUM_SLICES:-1}
QUEUED=${QUEUED:-0}

die() {
  echo "error: $*" >&2
  exit 2
}

# quote ARG: ARG as a shell word (single-quoted unless it is plain).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD ARGS...: print (dry run) or execute one command.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local arg line=""
    for arg in "$@"; do
      line+="${line:+ }$(quote "$arg")"
    done
    echo "$line"
  else
    "$@"
  fi
}

# Flags shared by every script; returns 0 when it consumed "$1".
common_flag() {
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --project=*) PROJECT=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --name=*) TPU_NAME=${1#*=} ;;
    --num-slices=*) NUM_SLICES=${1#*=} ;;
    --queued) QUEUED=1 ;;
    *) return 1 ;;
  esac
}

require_common() {
  [[ -n "$TPU_NAME" ]] || die "--name (or TPU_NAME) is required"
  [[ -n "$ZONE" ]] || die "--zone (or ZONE) is required"
  [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer"
}

project_flag() {
  if [[ -n "$PROJECT" ]]; then
    echo "--project=$PROJECT"
  fi
}

# The TPU VM node names: one per slice (queued resources name them PREFIX-0, PREFIX-1, ...).
node_names() {
  if [[ "$NUM_SLICES" -gt 1 ]]; then
    local i
    for ((i = 0; i < NUM_SLICES; i++)); do
      echo "${TPU_NAME}-${i}"
    done
  else
    echo "$TPU_NAME"
  fi
}

# on_all_workers COMMAND: run a shell command on every worker of every slice, in parallel.
on_all_workers() {
  local command=$1 node pids=() status=0
  local -a extra=()
  if [[ -n "$PROJECT" ]]; then
    extra+=("--project=$PROJECT")
  fi
  while read -r node; do
    if [[ "$DRY_RUN" == 1 ]]; then
      run gcloud compute tpus tpu-vm ssh "$node" "--zone=$ZONE" "${extra[@]}" --worker=all \
        "--command=$command"
    else
      run gcloud compute tpus tpu-vm ssh "$node" "--zone=$ZONE" "${extra[@]}" --worker=all \
        "--command=$command" &
      pids+=("$!")
    fi
  done < <(node_names)
  for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
  done
  return "$status"
}
