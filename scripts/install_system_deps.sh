#!/usr/bin/env bash
# Installs the Debian packages the build needs (compiler, CMake, Ninja,
# GoogleTest, Python venv support), calling apt-get only when something is
# missing, so a rerun on a ready machine is instant and needs no network.
#
# PYTHON names the interpreter the virtual environment will be made from
# (default: python3).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
missing=()

need_command() {  # need_command COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}

need_command g++ g++
need_command make make
need_command cmake cmake
need_command ninja ninja-build
[[ -f /usr/include/gtest/gtest.h ]] || missing+=(libgtest-dev)
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "Installing Debian packages: ${missing[*]}"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
