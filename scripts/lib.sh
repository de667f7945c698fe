# Shared by scripts/run and scripts/test: install what a fresh Debian machine lacks, and when
# something fails, say at which step.
# shellcheck shell=bash

VENV=${VENV:-.venv}
# Seconds to wait while another apt run holds apt's or dpkg's lock (a machine still provisioning).
APT_LOCK_TIMEOUT=${APT_LOCK_TIMEOUT:-300}

STEP="starting"
step() {
  STEP=$*
}
_say_failed_step() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "${0#./}: failed at step: $STEP (exit status $status)" >&2
  fi
}
trap _say_failed_step EXIT

apt_get() {
  # One apt-get command, waiting up to APT_LOCK_TIMEOUT seconds for a lock another apt run
  # holds. apt's own DPkg::Lock::Timeout covers dpkg's lock but not the package lists' lock of
  # `apt-get update`, and waits in silence: so a refusal for a lock is retried here, saying so.
  local sudo="" errors status said="" deadline=$((SECONDS + APT_LOCK_TIMEOUT))
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  while :; do
    # LC_ALL=C: a lock is recognised by apt's English words.
    errors=$($sudo env LC_ALL=C DEBIAN_FRONTEND=noninteractive apt-get -qq "$@" 2>&1 >/dev/null) && return 0
    status=$?
    if [[ $errors != *"Could not get lock"* && $errors != *"Unable to acquire the dpkg"* ]] \
      || [ "$SECONDS" -ge "$deadline" ]; then
      printf '%s\n' "$errors" >&2
      return "$status"
    fi
    if [ -z "$said" ]; then
      echo "${0#./}: waiting up to $APT_LOCK_TIMEOUT s for another apt run: ${errors%%$'\n'*}" >&2
      said=1
    fi
    sleep 1
  done
}

apt_install() {
  # Installs the named Debian packages; runs `apt-get update` once per script run.
  step "installing Debian packages: $*"
  if [ -z "${_APT_UPDATED:-}" ]; then
    apt_get update
    _APT_UPDATED=1
  fi
  apt_get install -y "$@"
}

ensure_python() {
  step "finding Python 3.11 or newer"
  if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv python3-pip
    step "finding Python 3.11 or newer"
  fi
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "python3 is $(python3 -V 2>&1); ai-policy-gateway needs Python 3.11 or newer" >&2
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      apt_install python3-venv
      step "creating $VENV"
      python3 -m venv "$VENV"
    fi
  fi
}

pip_install() {
  step "installing into $VENV: pip install $*"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
