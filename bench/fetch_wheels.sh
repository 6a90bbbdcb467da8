#!/usr/bin/env bash
# Download, here (where pip reaches the registry), the Python 3.12 x86-64 wheels of what the GPU
# machine's image lacks, into .whl/ (git-ignored). bench/gpu_proof.sh installs them there offline:
#
#   bash bench/fetch_wheels.sh            # then run bench/gpu_proof.sh on the device, carrying .whl
#
# The image has torch, timm, typer, pyarrow, fsspec, numpy, pillow, tqdm, huggingface-hub,
# safetensors, click, cloudpickle, jinja2, msgpack, psutil, pyyaml, sortedcontainers, toolz and
# setuptools (docs of the device tool, KINDS.md); it lacks zarr, numcodecs, diffusers, webdataset,
# dask and distributed, and these needs of theirs. Versions are the ones this checkout's venv
# (.venv) runs, so the GPU runs the code the tests here ran; a name the venv lacks takes the
# version below. setuptools travels for the editable install's isolated build (pyproject asks
# for setuptools>=77; the image's may be older).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${DEST:-.whl}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# name==fallback version (used when the venv does not have the package)
WANTED=(
  zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
  webdataset==1.0.2 braceexpand==0.1.7
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0
  setuptools==84.2.1
)

pins=()
for w in "${WANTED[@]}"; do
  name=${w%%==*}
  have=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name" 2>/dev/null || true)
  pins+=("$name==${have:-${w##*==}}")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for pin in "${pins[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DEST" "$pin"
done
ls -l "$DEST"
du -sh "$DEST"
echo "wheels in $DEST: carry it to the device (run's carry: [\"$DEST\"]) and run: bash bench/gpu_proof.sh"
