#!/usr/bin/env bash
# Syncs this repo to every worker of a TPU VM, installs it, and runs one command on ALL workers.
#
#   gcp/launch.sh --name=lm-v5e --zone=us-west4-a -- \
#       lm train --experiment=gpt2_124m --workdir=gs://my-bucket/runs/gpt2 --config.optim.lr=6e-4
#
# Multi-host TPU slices need every host to run the same program and call
# jax.distributed.initialize() before touching the backend; `lm train` and `lm sample` do that
# (lm/distributed.py) when LM_MULTIHOST=1, which this script sets. Every host then trains,
# evaluates and samples (the parameters are sharded across hosts); host 0 writes the report.
# Use a gs:// workdir: each worker has its own disk, and only the primary host writes metrics.
#
# Steps (each one a printed command with --dry-run):
#   1. pack the repo's tracked and untracked-but-not-ignored files into a tarball (git ls-files);
#   2. copy it to all workers (tpu-vm scp --worker=all) and unpack it into --remote-dir;
#   3. `make install PYTHON=python3.11` there (creates .venv; apt-installs python3.11, its venv
#      module and make when missing: TPU VM images ship Ubuntu 22.04's python 3.10, and setup.py
#      needs >= 3.11), then add jax[tpu] at the installed jax version;
#   4. run the command on all workers (tpu-vm ssh --worker=all) with LM_MULTIHOST=1 and the
#      venv on PATH.
#
# Flags:
#   --name NAME          TPU VM name                                               (required)
#   --zone ZONE          its zone                                                  (required)
#   --project PROJECT    defaults to gcloud's configured project
#   --remote-dir DIR     checkout directory on the workers, relative to home (default: lm)
#   --env KEY=VALUE      extra environment variable for the command (repeatable)
#   --no-sync            skip steps 1-3 (code and venv already on the workers)
#   --no-install         skip step 3 only
#   --python PYTHON      interpreter for the venv on the workers (default: python3.11)
#   --jax-extra EXTRA    jax extra installed in step 3 (default: tpu; "" to skip)
#   --detach             run in the background (setsid nohup), output in DIR/launch.log
#   --command 'CMD'      the command as one already-quoted string, instead of `-- CMD ARGS...`
#   --dry-run            print the commands instead of running them (or DRY_RUN=1)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NAME="" ZONE="" PROJECT="" REMOTE_DIR="lm" SYNC=1 INSTALL=1 JAX_EXTRA="tpu" DETACH=0
PYTHON="python3.11"
COMMAND_STR="" ENV_VARS=()
USER_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --name) need_value "$1" "${2:-}"; NAME="$2"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --zone) need_value "$1" "${2:-}"; ZONE="$2"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --project) need_value "$1" "${2:-}"; PROJECT="$2"; shift ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --remote-dir) need_value "$1" "${2:-}"; REMOTE_DIR="$2"; shift ;;
    --env=*) ENV_VARS+=("${1#*=}") ;;
    --env) need_value "$1" "${2:-}"; ENV_VARS+=("$2"); shift ;;
    --python=*) PYTHON="${1#*=}" ;;
    --python) need_value "$1" "${2:-}"; PYTHON="$2"; shift ;;
    --jax-extra=*) JAX_EXTRA="${1#*=}" ;;
    --jax-extra) JAX_EXTRA="${2-}"; [[ $# -ge 2 ]] || die "--jax-extra needs a value"; shift ;;
    --command=*) COMMAND_STR="${1#*=}" ;;
    --command) need_value "$1" "${2:-}"; COMMAND_STR="$2"; shift ;;
    --no-sync) SYNC=0 ;;
    --no-install) INSTALL=0 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; USER_ARGS=("$@"); break ;;
    *) die "unknown argument '$1' (put the command to run after --)" ;;
  esac
  shift
done

[[ -n "$NAME" ]] || die "missing --name (the TPU VM name)"
[[ -n "$ZONE" ]] || die "missing --zone (e.g. us-west4-a)"
if [[ -n "$COMMAND_STR" && ${#USER_ARGS[@]} -gt 0 ]]; then
  die "give the command either with --command or after --, not both"
fi
if [[ -z "$COMMAND_STR" ]]; then
  [[ ${#USER_ARGS[@]} -gt 0 ]] || die "missing command: put it after --, e.g. -- lm train ..."
  COMMAND_STR="$(quote_all "${USER_ARGS[@]}")"
fi
[[ "$PYTHON" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--python must be a plain name or path, got '$PYTHON'"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir must be a plain path, got '$REMOTE_DIR'"
for kv in "${ENV_VARS[@]+"${ENV_VARS[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
done

PROJECT_FLAG=()
[[ -n "$PROJECT" ]] && PROJECT_FLAG=(--project="$PROJECT")
TPU=(compute tpus tpu-vm)
require_gcloud

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ((SYNC)); then
  TARBALL="${TMPDIR:-/tmp}/lm-src-$NAME.tar.gz"
  REMOTE_TARBALL="/tmp/lm-src.tar.gz"
  # Tracked files plus new files that .gitignore does not exclude (no .venv, no runs/).
  run_shell "git -C $(quote "$REPO") ls-files -z --cached --others --exclude-standard \
| tar -czf $(quote "$TARBALL") -C $(quote "$REPO") --null -T -"
  run gcloud "${TPU[@]}" scp "$TARBALL" "$NAME:$REMOTE_TARBALL" --worker=all --zone="$ZONE" \
    "${PROJECT_FLAG[@]}"
  setup="set -e; mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && cd $REMOTE_DIR"
  if ((INSTALL)); then
    pkgs="$PYTHON $PYTHON-venv make"
    setup+=" && { { command -v make && $PYTHON -c 'import ensurepip'; } >/dev/null 2>&1"
    setup+=" || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive"
    setup+=" apt-get install -y -qq $pkgs; }; }"
    setup+=" && make install PYTHON=$PYTHON"
    if [[ -n "$JAX_EXTRA" ]]; then
      # The extra must match the jax that setup.py resolved, or pip would up/downgrade jax.
      ver='$(.venv/bin/python -c "import jax; print(jax.__version__)")'
      setup+=" && .venv/bin/python -m pip install -q \"jax[$JAX_EXTRA]==$ver\""
    fi
  fi
  run gcloud "${TPU[@]}" ssh "$NAME" --worker=all --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --command="$setup"
fi

exports="LM_MULTIHOST=1"
for kv in "${ENV_VARS[@]+"${ENV_VARS[@]}"}"; do
  exports+=" ${kv%%=*}=$(quote "${kv#*=}")"
done
remote="cd $REMOTE_DIR && export $exports PATH=\"\$HOME/$REMOTE_DIR/.venv/bin:\$PATH\" && "
if ((DETACH)); then
  remote+="setsid nohup bash -c $(quote "$COMMAND_STR") > launch.log 2>&1 < /dev/null &"
else
  remote+="$COMMAND_STR"
fi
run gcloud "${TPU[@]}" ssh "$NAME" --worker=all --zone="$ZONE" "${PROJECT_FLAG[@]}" \
  --command="$remote"
