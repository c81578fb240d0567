#!/usr/bin/env bash
# Install flexolmo_jax (with the TPU extra) on every worker of every slice.
#
#   launch/install.sh --name=flexolmo --zone=us-east5-a [--num-slices=N] [--project=P]
#       [--src=.]                       copy this checkout to every worker (default), or
#       [--repo=https://...git --ref=main]  clone it there
#       [--dir=flexolmo_jax] [--dry-run]
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$DIR/common.sh"

SRC=""
REPO=""
REF=main
REMOTE_DIR=flexolmo_jax
for arg in "$@"; do
  common_flag "$arg" && continue
  case "$arg" in
    --src=*) SRC=${arg#*=} ;;
    --repo=*) REPO=${arg#*=} ;;
    --ref=*) REF=${arg#*=} ;;
    --dir=*) REMOTE_DIR=${arg#*=} ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) die "unknown argument $arg" ;;
  esac
done
require_common
[[ -z "$SRC" || -z "$REPO" ]] || die "pass --src or --repo, not both"
if [[ -z "$REPO" ]]; then
  SRC=${SRC:-$(cd "$DIR/.." && pwd)}
  [[ -f "$SRC/setup.py" ]] || die "$SRC is not a flexolmo_jax checkout (no setup.py)"
  TARBALL=${TMPDIR:-/tmp}/flexolmo_jax_src.tar.gz
  run tar -czf "$TARBALL" -C "$SRC" --exclude=.git --exclude=workdir --exclude=__pycache__ .
  while read -r node; do
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$node:flexolmo_jax_src.tar.gz" \
      "--zone=$ZONE" --worker=all ${PROJECT:+"--project=$PROJECT"}
  done < <(node_names)
  fetch="mkdir -p $REMOTE_DIR && tar -xzf flexolmo_jax_src.tar.gz -C $REMOTE_DIR"
else
  fetch="(test -d $REMOTE_DIR/.git || git clone $REPO $REMOTE_DIR) && git -C $REMOTE_DIR fetch --all && git -C $REMOTE_DIR checkout $REF"
fi
on_all_workers "set -e; $fetch && cd $REMOTE_DIR && python3 -m pip install --upgrade pip && python3 -m pip install -e '.[tpu]' && python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
