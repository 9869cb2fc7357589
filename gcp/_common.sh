# shellcheck shell=bash
# Helpers shared by create.sh, launch.sh and teardown.sh (sourced, not run).
#
# Every gcloud call goes through `run`, so `--dry-run` (or DRY_RUN=1) prints exactly the commands
# that would run, quoted so they can be pasted into a shell.

DRY_RUN="${DRY_RUN:-0}"
SCRIPT_NAME="$(basename "$0")"

die() {  # one-line usage error, exit 2
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

is_dry_run() { [[ "$DRY_RUN" == "1" || "$DRY_RUN" == "true" ]]; }

# quote WORD: the word as a shell token (same rules as Python's shlex.quote).
quote() {
  local s="$1" rep="'\\''"
  if [[ -z "$s" ]]; then
    printf "''"
  elif [[ "$s" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/"$rep"}"
  fi
}

# quote_all WORD...: the words as one shell command line.
quote_all() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^(--[A-Za-z0-9][A-Za-z0-9._-]*=)(.*)$ ]]; then
      # --flag='value with spaces' rather than '--flag=value with spaces': same word, easier read.
      out+="${out:+ }${BASH_REMATCH[1]}$(quote "${BASH_REMATCH[2]}")"
    else
      out+="${out:+ }$(quote "$word")"
    fi
  done
  printf '%s' "$out"
}

# run CMD ARGS...: print it (dry run) or echo it to stderr and run it.
run() {
  if is_dry_run; then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# run_shell LINE: same as run, for a line that needs a shell (pipes); LINE is already quoted.
run_shell() {
  if is_dry_run; then
    printf '%s\n' "$1"
  else
    echo "+ $1" >&2
    bash -c "set -euo pipefail; $1"
  fi
}

require_gcloud() {
  is_dry_run || command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found; install the Google Cloud SDK (or use --dry-run)"
}

# need_value FLAG VALUE: a flag given as the last word, with no value after it.
need_value() {
  [[ -n "${2:-}" ]] || die "$1 needs a value"
}
