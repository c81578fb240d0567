#!/usr/bin/env bash
# Run one command on every worker of every slice, in the installed checkout.
#
#   launch/run.sh --name=flexolmo --zone=us-east5-a [--num-slices=N] [--project=P]
#       [--dir=flexolmo_jax] [--log=run.log] [--dry-run] -- python -m flexolmo_jax.train ...
#
# jax.distributed initialises itself on TPU VMs (and across slices of a queued resource), so
# the same command runs everywhere. Output goes to --log on each worker and to this terminal.
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$DIR/common.sh"

REMOTE_DIR=flexolmo_jax
LOG=run.log
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then
    shift
    break
  fi
  if ! common_flag "$1"; then
    case "$1" in
      --dir=*) REMOTE_DIR=${1#*=} ;;
      --log=*) LOG=${1#*=} ;;
      -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
      *) die "unknown argument $1 (put the command after --)" ;;
    esac
  fi
  shift
done
require_common
[[ $# -gt 0 ]] || die "no command given; usage: launch/run.sh --name=N --zone=Z -- COMMAND..."
command=$(printf '%q ' "$@")
on_all_workers "cd $REMOTE_DIR && ${command% } 2>&1 | tee $LOG"
