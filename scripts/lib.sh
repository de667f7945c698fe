# Shared by scripts/run and scripts/test: install what a fresh Debian machine lacks.
# shellcheck shell=bash

VENV=${VENV:-.venv}

apt_install() {
  # Installs the named Debian packages; runs `apt-get update` once per script run.
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ -z "${_APT_UPDATED:-}" ]; then
    $sudo apt-get update -qq
    _APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

ensure_python() {
  if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv python3-pip
  fi
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "python3 is $(python3 -V 2>&1); ai-policy-gateway needs Python 3.11 or newer" >&2
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      apt_install python3-venv
      python3 -m venv "$VENV"
    fi
  fi
}

pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
