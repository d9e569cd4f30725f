#!/usr/bin/env bash
# Sets up .venv-lerobot in the repository root: the venv that runs LeRobot 0.4.4's SmolVLA to
# regenerate the reference fixtures under test/data/smolvla (tools/make_smolvla_reference.py; see
# docs/smolvla_reference.md). It is apart from .venv because lerobot 0.4.4 pins torch<2.11 and
# transformers<5. CI does not build it: it compares against the fixtures checked in.
#
# A fresh Python 3.11 venv, then
#   1. torch and torchvision as pip resolves them on this machine (a local file store holds
#      torch 2.14.1 / torchvision 0.29.1); lerobot's torch<2.11 pin is metadata only: SmolVLA runs
#      on the newer torch.
#   2. requirements-lerobot.txt: exactly what lerobot.policies.smolvla and lerobot.processor import,
#      pinned (transformers 4.57.6, num2words for SmolVLMProcessor, pyserial, ...).
#   3. lerobot==0.4.4 with --no-deps (its own dependencies would pull torch<2.11 as the CUDA build
#      and the robot/dataset extras: 8.4 GB).
#   4. a check that SmolVLA's modules import.
#
# Idempotent and fast when nothing changed: a stamp file in the venv holds the hash of
# requirements-lerobot.txt and this script; the steps run only when it differs. Full pip output goes
# to build/bootstrap-lerobot.log; on failure its tail is printed.
#
# Run it (`bash tools/bootstrap-lerobot.sh`) or source it; either way it sets and exports nothing in
# the calling shell. Then: .venv-lerobot/bin/python tools/make_smolvla_reference.py --out test/data/smolvla
#
# Environment: FLASHRT_PYTHON  interpreter to create the venv with (default: python3.11, python3).

_flashrt_bootstrap_lerobot() (
  set -euo pipefail

  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$root/.venv-lerobot"
  py="$venv/bin/python"
  log="$root/build/bootstrap-lerobot.log"
  pip_version="26.3"
  lerobot_version="0.4.4"
  start=$EPOCHREALTIME
  cd "$root"

  say() { echo "[lerobot-venv] $*"; }
  die() { echo "[lerobot-venv] error: $*" >&2; exit 1; }

  # Runs a step with its output in the log (which holds this run's steps only); on failure shows
  # the step's error lines and the end of its output, and stops.
  step() {
    local what="$1"; shift
    local out="$root/build/bootstrap-lerobot-step.log"
    say "$what ..."
    if [ -z "${log_started:-}" ]; then : >"$log"; log_started=1; fi
    echo "=== $(date -u +%FT%TZ) $what: $*" >>"$log"
    if "$@" >"$out" 2>&1; then
      cat "$out" >>"$log"; rm -f "$out"
      return
    fi
    cat "$out" >>"$log"
    {
      echo "----- error lines -----"
      grep -i -m 15 -E "error|failed" "$out" || true
      echo "----- last lines -----"
      tail -n 40 "$out"
    } >&2
    rm -f "$out"
    die "$what failed (full output: $log)"
  }

  mkdir -p "$root/build"
  if command -v flock >/dev/null; then
    exec 9>"$root/build/.bootstrap-lerobot.lock"
    flock 9
  fi

  if ! { [ -x "$py" ] && "$py" -c '' 2>/dev/null; }; then
    base="${FLASHRT_PYTHON:-}"
    if [ -z "$base" ]; then
      base="$(command -v python3.11 || command -v python3 || true)"
    fi
    [ -n "$base" ] || die "no python3 found; install Python 3.11 or set FLASHRT_PYTHON"
    version="$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    [ "$version" = "3.11" ] ||
      die "$base is Python $version; lerobot $lerobot_version on PyPI is for Python 3.10-3.12 and the fixtures were written with 3.11 (set FLASHRT_PYTHON)"
    rm -rf "$venv"
    step "creating venv with $base" "$base" -m venv "$venv"
  fi

  stamp="$venv/.flashrt-lerobot.sha256"
  hash="$(cat requirements-lerobot.txt tools/bootstrap-lerobot.sh | sha256sum | cut -d' ' -f1)"

  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_NO_INPUT=1

  # The stamp is removed before the steps and written after they all succeed: an interrupted or
  # failed run does them again.
  if [ "$(cat "$stamp" 2>/dev/null)" != "$hash" ]; then
    rm -f "$stamp"
    step "installing pip $pip_version" "$py" -m pip install --upgrade "pip==$pip_version"
    step "installing torch and torchvision (as pip resolves them here)" \
      "$py" -m pip install torch torchvision
    step "installing requirements-lerobot.txt (what SmolVLA and lerobot.processor import)" \
      "$py" -m pip install -r requirements-lerobot.txt
    step "installing lerobot $lerobot_version without its dependencies" \
      "$py" -m pip install --no-deps "lerobot==$lerobot_version"
    step "checking that SmolVLA's modules import" \
      env HF_HUB_OFFLINE=1 "$py" -c "import lerobot.policies.smolvla.modeling_smolvla, \
lerobot.policies.smolvla.processor_smolvla, lerobot.processor, transformers, tokenizers"
    echo "$hash" >"$stamp"
  fi

  versions="$("$py" -c 'import importlib.metadata as m; print(", ".join(p + " " + m.version(p) for p in ("lerobot", "torch", "transformers")))')"
  say "ready: $venv ($versions; $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $start }") s)"
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: run, then leave the caller's shell as it was (eval sees $? before unset runs).
  _flashrt_bootstrap_lerobot
  eval "unset -f _flashrt_bootstrap_lerobot; return $?"
fi
_flashrt_bootstrap_lerobot
