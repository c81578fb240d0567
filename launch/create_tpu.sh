#!/usr/bin/env bash
# Create a TPU VM slice, or a queued resource (one or several slices for multislice).
#
#   launch/create_tpu.sh --name=flexolmo --zone=us-east5-a --type=v5p-128 [--project=P]
#       [--version=v2-alpha-tpuv5] [--queued] [--num-slices=2] [--spot | --reserved] [--dry-run]
#
# --queued (implied by --num-slices > 1) requests a queued resource, which waits for
# capacity; multislice nodes are named NAME-0, NAME-1, ... and get the MEGASCALE settings
# that jax.distributed needs from the queued-resource service.
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$DIR/common.sh"

TYPE=${ACCELERATOR_TYPE:-}
VERSION=${RUNTIME_VERSION:-}
PRICING=""
for arg in "$@"; do
  common_flag "$arg" && continue
  case "$arg" in
    --type=*) TYPE=${arg#*=} ;;
    --version=*) VERSION=${arg#*=} ;;
    --spot) PRICING=--spot ;;
    --reserved) PRICING=--reserved ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown argument $arg" ;;
  esac
done
require_common
[[ -n "$TYPE" ]] || die "--type (e.g. v5p-128, v6e-64) is required"
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for $TYPE; pass --version" ;;
  esac
fi
args=("--zone=$ZONE" "--accelerator-type=$TYPE")
if [[ -n "$PROJECT" ]]; then
  args+=("--project=$PROJECT")
fi

if [[ "$QUEUED" == 1 || "$NUM_SLICES" -gt 1 ]]; then
  if [[ "$NUM_SLICES" -gt 1 ]]; then
    nodes=("--node-count=$NUM_SLICES" "--node-prefix=$TPU_NAME")
  else
    nodes=("--node-id=$TPU_NAME")
  fi
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${args[@]}" \
    "--runtime-version=$VERSION" "${nodes[@]}" ${PRICING:+"$PRICING"}
  echo "# queued; watch with: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE" >&2
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${args[@]}" "--version=$VERSION" \
    ${PRICING:+"$PRICING"}
fi
