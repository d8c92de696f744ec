#!/usr/bin/env bash
# Run one command on every worker (host) of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b -- \
#       python -m fastk_jax.train --config=configs/gpt2_small.py \
#       --workdir=gs://my-bucket/gpt2_small
#
# Options:
#   --tpu=NAME        TPU VM name (required).
#   --zone=ZONE       TPU zone (required).
#   --project=ID      Google Cloud project (default: gcloud's configured one).
#   --repo_dir=DIR    Directory of this repository on the workers, the same
#                     path on each (default: fastk-jax, relative to the home
#                     directory).
#   --dry_run         Print the gcloud command instead of running it.
#
# Every worker must run the command: jax.distributed.initialize() (called by
# fastk_jax.distributed, auto-detected on TPU VMs) waits until all hosts of
# the slice have joined. The workdir must be storage that every worker can
# write, such as a gs:// bucket. Install the same code and package versions
# on every worker first.
set -euo pipefail

tpu="" zone="" project="" repo_dir="fastk-jax" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo_dir=*) repo_dir="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "Unknown option: $1 (put the command after --)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "Set --tpu=NAME and --zone=ZONE." >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "Put the command to run on every worker after --." >&2
  exit 2
fi

# The remote shell gets one string: each argument is quoted so that spaces
# and quotes in config overrides survive.
remote="cd $(printf '%q' "$repo_dir") &&"
for arg in "$@"; do
  remote+=" $(printf '%q' "$arg")"
done

command=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all
         --command="$remote")
if [[ -n "$project" ]]; then
  command+=(--project="$project")
fi

if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${command[@]}"
  printf '\n'
  exit 0
fi
if ! command -v gcloud > /dev/null; then
  echo "gcloud not found; install the Google Cloud CLI, or use --dry_run to" \
       "print the command." >&2
  exit 1
fi
exec "${command[@]}"
