#!/usr/bin/env bash
# Install edgetune as a systemd service on a Jetson (JetPack), or remove it.
#
#   sudo deploy/install.sh [--model DIR]          install or upgrade (idempotent)
#   sudo deploy/install.sh --uninstall [--purge]  remove; --purge also deletes the state directory
#
# It uses JetPack's own torch/torchvision (a venv with --system-site-packages and a pip constraint
# that pins them to the installed versions, so pip can never replace them), installs edgetune into
# <prefix>/venv, creates the `edgetune` system user (in the video/render/jtop groups that exist),
# installs the unit and a default /etc/edgetune/config.toml (never overwriting yours), enables
# jtop.service when jetson-stats is installed, and enables (re)starts edgetune.
#
# --root DIR installs into a throwaway root instead of / (every path is prefixed with DIR; no
# useradd, no systemctl): how the tests check that the files land where they should.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT=/
PREFIX=/opt/edgetune
SOURCE="$(dirname "$here")"
WHEEL=""
MODEL=""
PY="${PYTHON:-python3}"
NO_DEPS=0
ALLOW_PIP_TORCH=0
SYSTEMCTL=auto
UNINSTALL=0
PURGE=0

usage() {
  cat <<EOF
usage: $0 [options]
  --model DIR         model directory (edgetune init/train) imported on first start
  --root DIR          install under DIR instead of / (implies --no-systemctl, no useradd)
  --prefix DIR        install location (default /opt/edgetune; the venv is DIR/venv)
  --source DIR        edgetune source checkout to install (default: this script's checkout)
  --wheel FILE        install this edgetune wheel instead of a source checkout
  --python PY         the system python that has JetPack's torch (default python3)
  --no-deps           install edgetune only: its dependencies are already importable
                      (offline boards, tests): pip --no-deps --no-index --no-build-isolation
  --allow-pip-torch   NOT for a Jetson: let pip install torch/torchvision from PyPI (x86 testing)
  --no-systemctl      do not call systemctl
  --uninstall         remove edgetune (keeps the state directory and a changed config)
  --purge             with --uninstall: also delete /var/lib/edgetune, /etc/edgetune and the user
EOF
}

die() { echo "edgetune install: $*" >&2; exit 1; }
say() { echo "edgetune install: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --root) ROOT="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --source) SOURCE="$2"; shift 2 ;;
    --wheel) WHEEL="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --no-deps) NO_DEPS=1; shift ;;
    --allow-pip-torch) ALLOW_PIP_TORCH=1; shift ;;
    --no-systemctl) SYSTEMCTL=no; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge only goes with --uninstall"

ROOT="$(cd "$ROOT" 2>/dev/null && pwd)" || die "--root: no such directory"
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
r() { if [ "$ROOT" = / ]; then echo "$1"; else echo "$ROOT$1"; fi; }  # a target path under the root

ON_HOST=0; [ "$ROOT" = / ] && ON_HOST=1
if [ "$SYSTEMCTL" = auto ]; then
  SYSTEMCTL=no
  if [ "$ON_HOST" = 1 ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then SYSTEMCTL=yes; fi
fi
if [ "$ON_HOST" = 1 ] && [ "$(id -u)" != 0 ]; then die "run as root (sudo $0 ...), or use --root DIR"; fi

VENV="$PREFIX/venv"
UNIT=/etc/systemd/system/edgetune.service
CONFIG_DIR=/etc/edgetune
STATE_DIR=/var/lib/edgetune
DEFAULT_CONFIG="$here/config.toml"
UNIT_SOURCE="$SOURCE/systemd/edgetune.service"
[ -f "$UNIT_SOURCE" ] || UNIT_SOURCE="$(dirname "$here")/systemd/edgetune.service"
CHANGED=0

# install_file SRC DEST MODE: copy only when the content differs (so a second run touches nothing)
install_file() {
  if [ -f "$2" ] && cmp -s "$1" "$2"; then return 0; fi
  mkdir -p "$(dirname "$2")"
  install -m "$3" "$1" "$2"
  say "wrote $2"
  CHANGED=1
}

# ---------------------------------------------------------------------------------------------
uninstall() {
  if [ "$SYSTEMCTL" = yes ]; then
    systemctl disable --now edgetune.service 2>/dev/null || true
  fi
  if [ -f "$(r $UNIT)" ]; then rm -f "$(r $UNIT)"; say "removed $(r $UNIT)"; fi
  [ "$SYSTEMCTL" = yes ] && systemctl daemon-reload
  if [ -d "$(r "$PREFIX")" ]; then rm -rf "$(r "$PREFIX")"; say "removed $(r "$PREFIX")"; fi
  local config
  config="$(r $CONFIG_DIR)/config.toml"
  if [ "$PURGE" = 1 ]; then
    rm -rf "$(r $STATE_DIR)" "$(r $CONFIG_DIR)"
    say "purged $(r $STATE_DIR) and $(r $CONFIG_DIR)"
    if [ "$ON_HOST" = 1 ] && id -u edgetune >/dev/null 2>&1; then userdel edgetune && say "removed user edgetune"; fi
    return 0
  fi
  if [ -f "$config" ] && cmp -s "$config" "$DEFAULT_CONFIG"; then rm -f "$config"; fi
  [ -f "$config" ] && say "kept $config (you changed it)"
  rmdir "$(r $CONFIG_DIR)" 2>/dev/null || true
  [ -d "$(r $STATE_DIR)" ] && say "kept $(r $STATE_DIR) (models, buffer, cycle history); --uninstall --purge deletes it"
  return 0
}

# ---------------------------------------------------------------------------------------------
jetpack_torch() {
  # "torch==X\ntorchvision==Y" for the system python's torch, or nothing
  "$PY" -c 'import torch, torchvision; print(f"torch=={torch.__version__}\ntorchvision=={torchvision.__version__}")' 2>/dev/null || true
}

source_stamp() {
  if [ -n "$WHEEL" ]; then
    sha256sum "$WHEEL" | cut -d' ' -f1
  else
    (cd "$SOURCE" && find pyproject.toml prune_core daemon -name '*.py' -o -name pyproject.toml | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -d' ' -f1
  fi
}

install_venv() {
  local venv pins constraints stamp target
  venv="$(r "$VENV")"
  pins="$(jetpack_torch)"
  if [ -z "$pins" ] && [ "$ALLOW_PIP_TORCH" = 0 ]; then
    die "torch and torchvision are not importable by $PY.
  On a Jetson: install NVIDIA's PyTorch for your JetPack (https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/)
  and the matching torchvision, check with: $PY -c 'import torch, torchvision; print(torch.cuda.is_available())'
  then run this again. pip's torch from PyPI has no Jetson CUDA support, so it is never installed here.
  Not a Jetson (testing only)? --allow-pip-torch lets pip install torch from PyPI."
  fi
  if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv (--system-site-packages: JetPack's torch stays the one used)"
    "$PY" -m venv --system-site-packages "$venv"
    CHANGED=1
  fi
  target="$(source_stamp)"
  stamp="$venv/.edgetune-source"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$target" ]; then
    say "edgetune in $venv is up to date"
    return 0
  fi
  constraints="$(mktemp)"
  printf '%s\n' "$pins" > "$constraints"
  local args=(--disable-pip-version-check --quiet)
  [ -n "$pins" ] && args+=(--constraint "$constraints")  # pip fails rather than replace JetPack's torch
  [ "$NO_DEPS" = 1 ] && args+=(--no-deps --no-index --no-build-isolation)
  say "installing edgetune into $venv"
  "$venv/bin/python" -m pip install "${args[@]}" "${WHEEL:-$SOURCE}" || { rm -f "$constraints"; die "pip install failed"; }
  rm -f "$constraints"
  if [ -n "$pins" ]; then
    local now
    now="$("$venv/bin/python" -c 'import torch, torchvision; print(f"torch=={torch.__version__}\ntorchvision=={torchvision.__version__}")')"
    [ "$now" = "$pins" ] || die "the venv's torch is not JetPack's any more ($now, expected $pins)"
  fi
  "$venv/bin/edgetune" --help >/dev/null || die "$venv/bin/edgetune does not run"
  echo "$target" > "$stamp"
  CHANGED=1
}

install_user() {
  if [ "$ON_HOST" = 0 ]; then say "not creating the edgetune user (--root)"; return 0; fi
  if ! id -u edgetune >/dev/null 2>&1; then
    local shell=/usr/sbin/nologin
    [ -x "$shell" ] || shell=/bin/false
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell "$shell" edgetune
    say "created system user edgetune"
  fi
  local g
  for g in video render jtop; do  # GPU device nodes; /run/jtop.sock (mode 660, group jtop)
    if getent group "$g" >/dev/null && ! id -nG edgetune | tr ' ' '\n' | grep -qx "$g"; then
      usermod -aG "$g" edgetune
      say "added edgetune to group $g"
    fi
  done
}

install_files() {
  local unit
  unit="$(mktemp)"
  sed "s#/opt/edgetune#$PREFIX#g" "$UNIT_SOURCE" > "$unit"
  install_file "$unit" "$(r $UNIT)" 0644
  rm -f "$unit"
  install_file "$DEFAULT_CONFIG" "$(r "$PREFIX")/config.toml.default" 0644
  [ -f "$SOURCE/README.md" ] && install_file "$SOURCE/README.md" "$(r "$PREFIX")/README.md" 0644
  local config
  config="$(r $CONFIG_DIR)/config.toml"
  if [ ! -e "$config" ]; then
    install_file "$DEFAULT_CONFIG" "$config" 0644
  elif ! cmp -s "$config" "$DEFAULT_CONFIG"; then
    say "kept your $config (defaults: $(r "$PREFIX")/config.toml.default)"
  fi
  if [ -n "$MODEL" ]; then
    [ -f "$MODEL/model.json" ] || die "--model $MODEL: no model.json there (make one with edgetune init/train)"
    if [ -e "$(r $CONFIG_DIR)/model" ]; then
      say "kept $(r $CONFIG_DIR)/model (remove it first to import another model on an empty state directory)"
    else
      cp -r "$MODEL" "$(r $CONFIG_DIR)/model"
      chmod -R a+rX "$(r $CONFIG_DIR)/model"
      say "copied $MODEL to $(r $CONFIG_DIR)/model (imported on first start)"
      CHANGED=1
    fi
  fi
}

start_services() {
  if [ "$SYSTEMCTL" = no ]; then say "not calling systemctl"; return 0; fi
  systemctl daemon-reload
  if systemctl cat jtop.service >/dev/null 2>&1; then
    systemctl enable --now jtop.service && say "jtop.service (jetson-stats) enabled"
  fi
  systemctl enable edgetune.service >/dev/null
  if [ ! -e "$CONFIG_DIR/model" ] && [ ! -e "$STATE_DIR/models/active" ]; then
    say "no model yet: copy one to $CONFIG_DIR/model (or re-run with --model DIR), then: systemctl start edgetune"
  elif [ "$CHANGED" = 1 ]; then
    systemctl restart edgetune.service
  else
    systemctl is-active --quiet edgetune.service || systemctl start edgetune.service
  fi
}

if [ "$UNINSTALL" = 1 ]; then
  uninstall
  exit 0
fi
[ -f "$DEFAULT_CONFIG" ] && [ -f "$UNIT_SOURCE" ] || die "cannot find config.toml and systemd/edgetune.service next to $0"
[ -n "$WHEEL" ] || [ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE is not an edgetune checkout"
install_venv
install_user
install_files
start_services
cat <<EOF

edgetune is installed ($(r "$PREFIX")).
  status:   systemctl status edgetune      (its Status: line is the scheduler's state)
  logs:     journalctl -u edgetune -f      (-p warning for warnings and errors only)
  API:      curl localhost:8000/status
  config:   $CONFIG_DIR/config.toml, then: systemctl restart edgetune
  remove:   $0 --uninstall [--purge]
EOF
