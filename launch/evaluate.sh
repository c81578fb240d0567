#!/usr/bin/env bash
# Evaluate a model on every worker of every slice (results are written by worker 0).
#
#   launch/evaluate.sh --name=flexolmo --zone=us-east5-a [--dry-run] -- \
#       --ckpt=/mnt/shared/flexolmo_8x7b --data=/mnt/shared/data --tasks=/mnt/shared/mc9.jsonl \
#       --opt-out-matrix --out=eval_8x7b --seq_len=4096 --batch_size=8
#
# Flags before -- go to launch/run.sh; flags after it to python -m flexolmo_jax.evaluate.
# Copy the results back with:
#   gcloud compute tpus tpu-vm scp --recurse --worker=0 NAME:flexolmo_jax/OUT . --zone=ZONE
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$DIR/common.sh"

pass=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; break ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    *) pass+=("$1") ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "pass the evaluate flags after -- (at least --ckpt and --out)"
exec "$DIR/run.sh" "${pass[@]}" --log=evaluate.log -- python3 -m flexolmo_jax.evaluate "$@"
