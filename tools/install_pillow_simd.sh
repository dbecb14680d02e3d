#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD (same `PIL` module, faster resampling) in the given interpreter.
# It builds from source and needs a C compiler and the libjpeg and zlib headers
# (Debian/Ubuntu: build-essential libjpeg-dev zlib1g-dev; add libwebp-dev for .webp images). It runs last, because other packages
# pull plain Pillow back in. pip keeps the built wheel in its cache, so a second run is quick.
# If the build fails, plain Pillow stays and we say so: kdcache works with either and records
# which one rendered a cache.
set -u
PY=${1:-python3}
# Already active? (A later pip run may have put plain Pillow back over it, so check what imports.)
if "$PY" -c 'import PIL, importlib.metadata as m; assert m.version("Pillow-SIMD") == PIL.__version__' 2>/dev/null; then
  exit 0
fi
log=$(mktemp)
# Build with the interpreter's own setuptools and pybind11 when it has them (the Makefile installs
# the locked ones); pip's build isolation would fetch the newest instead. The version comes from
# the lock when PIP_CONSTRAINT names it.
build=()
if "$PY" -c 'import setuptools, pybind11' 2>/dev/null; then build=(--no-build-isolation); fi
"$PY" -m pip uninstall -q -y pillow pillow-simd >"$log" 2>&1
if CC="${CC:-cc} -mavx2" "$PY" -m pip install -q --no-deps "${build[@]}" pillow-simd >>"$log" 2>&1 \
   || "$PY" -m pip install -q --no-deps "${build[@]}" pillow-simd >>"$log" 2>&1; then
  echo "install_pillow_simd: Pillow-SIMD installed"
  if ! "$PY" -c 'from PIL import features; assert features.check("webp")' 2>/dev/null; then
    echo "install_pillow_simd: note: built without WebP (no libwebp headers); .webp samples will not decode." >&2
    echo "                    For WebP: install libwebp-dev, then 'pip uninstall -y pillow-simd' and re-run this script." >&2
  fi
else
  echo "WARNING: Pillow-SIMD failed to build; keeping plain Pillow (kdcache works with either)." >&2
  echo "         For the faster build install a C compiler and the libjpeg and zlib headers." >&2
  tail -n 20 "$log" >&2
  "$PY" -m pip install -q Pillow >/dev/null 2>&1
fi
rm -f "$log"
