#!/usr/bin/env bash
# Train a FlexOlmo stage on every worker of every slice.
#
#   launch/train.sh --name=flexolmo --zone=us-east5-a --config=configs/flexolmo_2x7b.py:math \
#       --workdir=/mnt/shared/math [--num-slices=N] [--dry-run] [-- --config.train.steps=100 ...]
#
# Other flags go to launch/run.sh (--project, --dir, --log). With --num-slices > 1 the mesh's
# data axis spans the slices (--config.mesh.data=N); fsdp stays inside a slice. The workdir
# must be the same shared path on every worker (e.g. a Filestore or gcsfuse mount).
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$DIR/common.sh"

CONFIG=""
WORKDIR=""
pass=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; break ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *)
      pass+=("$1")
      if [[ "$1" == --num-slices=* ]]; then
        NUM_SLICES=${1#*=}
      fi
      ;;
  esac
  shift
done
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
cmd=(python3 -m flexolmo_jax.train "--config=$CONFIG" "--workdir=$WORKDIR")
if [[ "$NUM_SLICES" -gt 1 ]]; then
  cmd+=("--config.mesh.data=$NUM_SLICES")
fi
exec "$DIR/run.sh" "${pass[@]}" --log=train.log -- "${cmd[@]}" "$@"
