#!/usr/bin/env bash
# Deletes a TPU VM (or its queued resource, which deletes the VM with it). Does not prompt.
#
#   gcp/teardown.sh --name=lm-v5e --zone=us-west4-a [--queued]
#
# Flags:
#   --name NAME        TPU VM / queued resource name            (required)
#   --zone ZONE        zone it was created in                   (required)
#   --project PROJECT  defaults to gcloud's configured project
#   --queued           it was created with `create.sh --queued`
#   --dry-run          print the gcloud commands instead of running them (or DRY_RUN=1)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NAME="" ZONE="" PROJECT="" QUEUED=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --name) need_value "$1" "${2:-}"; NAME="$2"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --zone) need_value "$1" "${2:-}"; ZONE="$2"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --project) need_value "$1" "${2:-}"; PROJECT="$2"; shift ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$NAME" ]] || die "missing --name (the TPU VM name)"
[[ -n "$ZONE" ]] || die "missing --zone (e.g. us-west4-a)"

PROJECT_FLAG=()
[[ -n "$PROJECT" ]] && PROJECT_FLAG=(--project="$PROJECT")
require_gcloud

if ((QUEUED)); then
  # --force deletes the TPU VM that the queued resource created, too.
  run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet \
    "${PROJECT_FLAG[@]}"
else
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet "${PROJECT_FLAG[@]}"
fi
