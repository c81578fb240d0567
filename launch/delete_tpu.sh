#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its nodes.
#
#   launch/delete_tpu.sh --name=flexolmo --zone=us-east5-a [--queued | --num-slices=N]
#       [--project=P] [--dry-run]
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$DIR/common.sh"

for arg in "$@"; do
  common_flag "$arg" && continue
  case "$arg" in
    -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
    *) die "unknown argument $arg" ;;
  esac
done
require_common
args=("--zone=$ZONE" --quiet)
if [[ -n "$PROJECT" ]]; then
  args+=("--project=$PROJECT")
fi
if [[ "$QUEUED" == 1 || "$NUM_SLICES" -gt 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${args[@]}" --force
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${args[@]}"
fi
