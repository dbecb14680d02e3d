#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD (same `PIL` module, faster resampling) in the given interpreter.
# It builds from source and needs libjpeg and zlib headers (Debian: libjpeg-dev zlib1g-dev).
# Runs last, because other packages pull plain Pillow back in. If the build fails, plain Pillow
# stays and we say so: kdcache works with either, and records which one rendered a cache.
set -u
PY=${1:-python3}
# Already active? (A later pip run may have put plain Pillow back over it, so check what imports.)
if "$PY" -c 'import PIL, importlib.metadata as m; assert m.version("Pillow-SIMD") == PIL.__version__' 2>/dev/null; then
  exit 0
fi
log=$(mktemp)
if CC="${CC:-cc} -mavx2" "$PY" -m pip install -q --no-deps --force-reinstall --no-cache-dir pillow-simd >"$log" 2>&1 \
   || "$PY" -m pip install -q --no-deps --force-reinstall --no-cache-dir pillow-simd >>"$log" 2>&1; then
  # pillow-simd and Pillow both own PIL/; drop Pillow's record without touching the files.
  "$PY" - <<'PYEOF'
import importlib.metadata as m, shutil, pathlib
try:
    d = m.distribution("Pillow")
except m.PackageNotFoundError:
    raise SystemExit(0)
info = pathlib.Path(d._path)  # the .dist-info folder
shutil.rmtree(info, ignore_errors=True)
PYEOF
  echo "install_pillow_simd: Pillow-SIMD installed"
else
  echo "WARNING: Pillow-SIMD failed to build (see below); keeping plain Pillow. Install libjpeg-dev and zlib1g-dev for the faster build." >&2
  tail -n 20 "$log" >&2
  "$PY" -m pip install -q --force-reinstall --no-deps Pillow >/dev/null 2>&1 || true
fi
rm -f "$log"
