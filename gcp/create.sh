#!/usr/bin/env bash
# Creates a Cloud TPU VM (or a queued resource that becomes one when capacity frees up).
#
#   gcp/create.sh --name=lm-v5e --zone=us-west4-a --accelerator-type=v5litepod-16 [--spot]
#   gcp/create.sh --name=lm-v5e --zone=us-west4-a --accelerator-type=v5litepod-16 --queued --spot
#
# Flags:
#   --name NAME                 TPU VM (and queued resource) name             (required)
#   --zone ZONE                 e.g. us-west4-a, us-central2-b                (required)
#   --accelerator-type TYPE     e.g. v4-8, v5litepod-16, v5p-32, v6e-8        (required; alias --type)
#   --version VERSION           TPU runtime (software) version; default by accelerator family:
#                               v4: tpu-ubuntu2204-base, v5litepod: v2-alpha-tpuv5-lite,
#                               v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
#   --project PROJECT           defaults to gcloud's configured project
#   --spot                      Spot VM (cheap, can be preempted at any time)
#   --preemptible               legacy preemptible VM (not with --queued; use --spot there)
#   --queued                    create through `queued-resources` (waits for capacity)
#   --dry-run                   print the gcloud commands instead of running them (or DRY_RUN=1)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" SPOT=0 PREEMPTIBLE=0 QUEUED=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --name) need_value "$1" "${2:-}"; NAME="$2"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --zone) need_value "$1" "${2:-}"; ZONE="$2"; shift ;;
    --accelerator-type=* | --type=*) TYPE="${1#*=}" ;;
    --accelerator-type | --type) need_value "$1" "${2:-}"; TYPE="$2"; shift ;;
    --version=* | --runtime-version=*) VERSION="${1#*=}" ;;
    --version | --runtime-version) need_value "$1" "${2:-}"; VERSION="$2"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --project) need_value "$1" "${2:-}"; PROJECT="$2"; shift ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$NAME" ]] || die "missing --name (the TPU VM name)"
[[ -n "$ZONE" ]] || die "missing --zone (e.g. us-west4-a)"
[[ -n "$TYPE" ]] || die "missing --accelerator-type (e.g. v5litepod-16)"
((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible are mutually exclusive"
((QUEUED && PREEMPTIBLE)) && die "--preemptible is not available with --queued; use --spot"

if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for accelerator type '$TYPE'; pass --version" ;;
  esac
fi

PROJECT_FLAG=()
[[ -n "$PROJECT" ]] && PROJECT_FLAG=(--project="$PROJECT")
require_gcloud

if ((QUEUED)); then
  cmd=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE"
    --accelerator-type="$TYPE" --runtime-version="$VERSION" "${PROJECT_FLAG[@]}")
  ((SPOT)) && cmd+=(--spot)
  run "${cmd[@]}"
  # Queued resources return at once; show where to watch the request.
  run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}"
else
  cmd=(gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE"
    --version="$VERSION" "${PROJECT_FLAG[@]}")
  ((SPOT)) && cmd+=(--spot)
  ((PREEMPTIBLE)) && cmd+=(--preemptible)
  run "${cmd[@]}"
fi
