# Sourced by scripts/test, scripts/check, scripts/demo and .ci/run: makes sure a virtual environment with
# gpupool[dev] installed (editable) exists, and puts it first on PATH.
#
#   GPUPOOL_VENV  where the venv lives (default .venv in the repository root)
#   PYTHON        the interpreter to make it with (default: the newest python3.1x >= 3.11 on PATH)
#   GPUPOOL_EXTRAS  the extras to install (default dev; scripts/bench asks for dev,bench)
#
# A stamp file inside the venv records pyproject.toml's hash, so the install is skipped when nothing changed.

gpupool_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gpupool_venv=${GPUPOOL_VENV:-$gpupool_root/.venv}

gpupool_find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "gpupool: needs Python 3.11 or newer on PATH (or set PYTHON)" >&2
  return 1
}

gpupool_ensure_venv() {
  if [ ! -x "$gpupool_venv/bin/python" ]; then
    local python
    python=$(gpupool_find_python)
    echo "gpupool: creating $gpupool_venv with $python" >&2
    if ! "$python" -m venv "$gpupool_venv"; then
      # Debian and Ubuntu ship venv's ensurepip separately.
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        local version
        version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$version-venv" ||
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        rm -rf "$gpupool_venv"
        "$python" -m venv "$gpupool_venv"
      else
        echo "gpupool: '$python -m venv' failed; install your distribution's python3-venv" >&2
        return 1
      fi
    fi
  fi
  local stamp="$gpupool_venv/.gpupool-dev-installed" want extras=${GPUPOOL_EXTRAS:-dev}
  want="$(cd "$gpupool_root" && cat pyproject.toml | sha256sum | cut -d' ' -f1) $extras"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] ||
     ! "$gpupool_venv/bin/python" -c 'import gpupool._version, pytest, grpc_tools' >/dev/null 2>&1; then
    echo "gpupool: installing gpupool[$extras] into $gpupool_venv" >&2
    "$gpupool_venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$gpupool_root[$extras]"
    echo "$want" > "$stamp"
  fi
  export VIRTUAL_ENV=$gpupool_venv
  export PATH="$gpupool_venv/bin:$PATH"
}
