#!/usr/bin/env bash
# Wheels the device machine lacks, for `make bench-gpu` (benchmarks/gpu_suite.py) and the rest of
# kdcache there. Run HERE (a machine that reaches the package registry), from any directory:
#
#     bash tools/device_prep.sh            # -> .whl/ (git-ignored), about 10 MiB
#
# The device machine (/work/.library/device/README.md, KINDS.md) has Python 3.12 with torch,
# torchvision, timm, triton, numpy, Pillow, click, tqdm, safetensors, fsspec, PyYAML, packaging and
# typing-extensions, but not zarr, numcodecs, webdataset, braceexpand, donfig or google-crc32c, and it
# reaches no registry. This downloads those (the versions constraints.txt locks, built for CPython 3.12
# on manylinux x86_64, without their dependencies: the rest is there) into .whl/. The `run` call then
# carries .whl, installs it into /tmp/site and puts the checkout on PYTHONPATH:
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site:$PWD || exit; ...
#
# docs/benchmarks.md ("Running the suite on the device machine") has the whole command.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST=.whl
PKGS="zarr numcodecs webdataset braceexpand donfig google-crc32c"
LIMIT_MIB=60  # the device tool carries at most 64 MiB of working tree, this included

pins=()
for p in $PKGS; do
  v=$(grep -i -E "^${p//-/[-_]}==" constraints.txt | head -1 | cut -d= -f3 || true)
  if [ -z "$v" ]; then echo "device_prep: $p is not in constraints.txt" >&2; exit 1; fi
  pins+=("$p==$v")
done

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "device_prep: downloading ${pins[*]} for CPython 3.12, manylinux x86_64" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${pins[@]}"

# one wheel per package (two versions of one stop the install there)
n=$(ls "$DEST"/*.whl | wc -l)
if [ "$n" -ne "$(echo $PKGS | wc -w)" ]; then
  echo "device_prep: expected $(echo $PKGS | wc -w) wheels in $DEST, found $n" >&2
  ls -l "$DEST" >&2
  exit 1
fi
bytes=$(cat "$DEST"/*.whl | wc -c)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -l "$DEST" >&2
echo "device_prep: $n wheels, $bytes bytes (~${mib} MiB) in $DEST" >&2
if [ "$mib" -gt "$LIMIT_MIB" ]; then
  echo "device_prep: more than ${LIMIT_MIB} MiB: the device tool carries at most 64 MiB in all" >&2
  exit 1
fi
