#!/usr/bin/env bash
# The GPU proof: one prepared run on a fresh GPU machine that installs what its image lacks, runs
# the CUDA tests and the benchmarks, and writes every figure into one JSON file.
#
#   bash bench/fetch_wheels.sh                  # here, once: the wheels the GPU image lacks -> .whl/
#   bash bench/gpu_proof.sh                     # on the GPU machine, from the repository root
#   bash bench/gpu_proof.sh --cpu-dry-run       # the same sequence on the CPU, tiny sizes, no installs
#
# Options:
#   --cpu-dry-run     tiny sizes on the CPU (SiT-tiny/2 and SiT-S/2, tiny teacher, batch 4, two
#                     timed steps); the CUDA tests run on the CPU (REPA_CUDA_TESTS_ON_CPU=1)
#   --out DIR         where gpu_proof.json and gpu_proof.log go (default: $OUT if set, else runs/gpu-proof)
#   --only A,B        run only these steps (names as in the JSON: install, cuda_tests, train_b2, ...)
#   --budget SECONDS  wall-clock budget of the whole sequence (default 480 on the GPU, 2400 dry)
#
# Steps, in this order (most important first, so that a run cut short by its budget keeps them):
#   env, install, cuda_tests, train_b2, train_xl2, encode_fp32, encode_bf16, loader, train_b2_compile,
#   train_xl2_compile, haste_xl2. Each runs under `timeout` with its own budget, cut to what is left of the
#   whole; a step that fails or times out is recorded (exit status, seconds) and the next one runs.
#   Every run writes gpu_proof.json: device, versions, each step's exit status and time, the CUDA
#   tests' outcomes, every benchmark's JSON, and a summary of the headline figures against the
#   project's GPU targets.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

MODE=gpu
OUTDIR=${OUT:-runs/gpu-proof}
ONLY=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) MODE=cpu-dry-run ;;
    --out) OUTDIR=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = gpu ]; then
  PY=${PY:-python3}
  DEVICE=cuda
  BUDGET=${BUDGET:-480}
else
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  DEVICE=cpu
  BUDGET=${BUDGET:-2400}
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-proof.XXXXXX")
mkdir -p "$WORK/logs"
STEPS_TSV=$WORK/steps.tsv
: >"$STEPS_TSV"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 DASK_LOGGING__DISTRIBUTED=error
T0=$(date +%s)

# ------------------------------------------------------------------------------------------------
# step NAME BUDGET_S [--stdout FILE] CMD...: run CMD under timeout, its output in $WORK/logs/NAME.log
# (stdout to FILE instead when given), and record name, exit status, seconds, budget and command.
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

step() {
  local name=$1 budget=$2; shift 2
  local stdout_file=""
  if [ "${1:-}" = --stdout ]; then stdout_file=$2; shift 2; fi
  case $name in
    env|install_target) ;;  # always: the device's name; the fallback of a failed install
    *) wanted "$name" || return 0 ;;
  esac
  local now left cmd
  cmd=$(printf '%s ' "$@" | tr '\n\t' '  ' | tr -s ' ' | cut -c1-400)  # one line, for the record
  now=$(date +%s); left=$((BUDGET - (now - T0)))
  if [ "$left" -lt 20 ]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped 0 "$budget" "$cmd" >>"$STEPS_TSV"
    echo "[$(date +%T)] $name: skipped (the run's budget of ${BUDGET}s is spent)"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "[$(date +%T)] $name: start (budget ${budget}s): ${cmd:0:200}"
  local t=$(date +%s) rc
  if [ -n "$stdout_file" ]; then
    timeout -k 15 "$budget" "$@" >"$stdout_file" 2>"$WORK/logs/$name.log"; rc=$?
  else
    timeout -k 15 "$budget" "$@" >"$WORK/logs/$name.log" 2>&1; rc=$?
  fi
  local secs=$(( $(date +%s) - t ))
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$budget" "$cmd" >>"$STEPS_TSV"
  local how="exit $rc"; { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && how="TIMED OUT after ${budget}s"
  echo "[$(date +%T)] $name: $how in ${secs}s"
  [ "$rc" = 0 ] || tail -n 15 "$WORK/logs/$name.log" | sed "s/^/    $name| /"
  return 0
}

# ------------------------------------------------------------------------------------------------
# sizes
if [ "$MODE" = gpu ]; then
  B2=SiT-B/2; XL2=SiT-XL/2; TEACHER=dinov2-vit-b
  TS_OPTS=(--device cuda --teacher "$TEACHER" --steps 10 --warmup 3 --samples 512)
  BATCH_B2=${BATCH_B2:-256}; BATCH_XL2=${BATCH_XL2:-256}
  ENC_OPTS=(--mode models --device cuda --images 256 --batch-size 128 --repeats 3)
  LOADER_OPTS=(--device cuda --batch-size 256 --block-sizes 64 --states warm --steps 16)
  TEST_OPTS=()
  "$PY" -c "import xdist" 2>/dev/null && TEST_OPTS=(-n 4)
  BUDGETS=(env=40 install=60 cuda_tests=150 train_b2=60 train_xl2=75 encode_fp32=35 encode_bf16=30 loader=40 \
           train_b2_compile=80 train_xl2_compile=120 haste_xl2=60)
  HASTE_OPTS=(--device cuda --model "$XL2" --teacher "$TEACHER" --layers 9-12 --batch-size 64 --steps 6 --warmup 2 --flops)
else
  B2=SiT-tiny/2; XL2=SiT-S/2; TEACHER=tiny
  TS_OPTS=(--device cpu --teacher "$TEACHER" --steps 2 --warmup 1 --num-workers 2)
  BATCH_B2=${BATCH_B2:-4}; BATCH_XL2=${BATCH_XL2:-4}
  ENC_OPTS=(--mode models --device cpu --images 4 --batch-size 2 --repeats 1)
  LOADER_OPTS=(--device cpu --batch-size 4 --block-sizes 16 --states warm --steps 4)
  TEST_OPTS=()
  export REPA_CUDA_TESTS_ON_CPU=1
  BUDGETS=(env=60 install=60 cuda_tests=1200 train_b2=240 train_xl2=300 encode_fp32=180 encode_bf16=180 loader=120 \
           train_b2_compile=400 train_xl2_compile=600 haste_xl2=120)
  HASTE_OPTS=(--device cpu --model SiT-tiny/2 --teacher "$TEACHER" --layers 2 --batch-size 4 --steps 2 --warmup 1 --flops)
fi
budget() { local kv; for kv in "${BUDGETS[@]}"; do [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }; done; echo 60; }

# ------------------------------------------------------------------------------------------------
# env: the device and the versions (also proves that python and torch start)
step env "$(budget env)" --stdout "$WORK/env.json" "$PY" - "$DEVICE" <<'EOF'
import json, os, platform, shutil, subprocess, sys
import torch
device = sys.argv[1]
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
        "platform": platform.platform()}
try:  # DataLoader workers hand batches over through shared memory
    info["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
except OSError:
    info["dev_shm_gib"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
else:
    name = platform.processor() or platform.machine()
    try:
        name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["device"] = f"CPU {name}, {os.cpu_count()} cores"
if device == "cuda" and not torch.cuda.is_available():
    print(json.dumps(info))
    sys.exit("error: no CUDA device visible to torch")
print(json.dumps(info))
EOF

# install: the carried wheels, then this checkout as the package repa_cache (editable)
if [ "$MODE" = gpu ]; then
  step install "$(budget install)" bash -c '
    set -e
    PY=$1
    ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl/: run bash bench/fetch_wheels.sh on a machine with pip access and carry .whl"; exit 3; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir $(ls .whl/*.whl | grep -v "/setuptools-")
    # editable install; its isolated build takes setuptools from .whl (pyproject asks for >=77)
    if ! "$PY" -m pip install -q --no-index --no-deps --find-links .whl -e .; then
      echo "editable install failed; linking the checkout as repa_cache through a .pth file instead"
      site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")
      mkdir -p /tmp/repa-link && ln -sfn "$PWD" /tmp/repa-link/repa_cache
      echo /tmp/repa-link >"$site/repa_cache_link.pth"
    fi
    cd /tmp && "$PY" -c "import repa_cache.cli, zarr, numcodecs, diffusers, webdataset, dask, distributed
from diffusers import AutoencoderKL
print(\"repa_cache from\", repa_cache.__path__[0], \"zarr\", zarr.__version__, \"numcodecs\", numcodecs.__version__,
      \"diffusers\", diffusers.__version__, \"dask\", dask.__version__, \"distributed\", distributed.__version__)"
  ' install "$PY"
  # Where the image's environment cannot take packages: the device tool's own recipe instead
  # (a --target folder and a link named repa_cache on PYTHONPATH, which every subprocess inherits).
  if wanted install && ! (cd /tmp && "$PY" -c "import repa_cache.cli, zarr, numcodecs, diffusers, webdataset, distributed") >/dev/null 2>&1; then
    step install_target "$(budget install)" bash -c '
      set -e
      mkdir -p /tmp/repa-site /tmp/repa-link && ln -sfn "$PWD" /tmp/repa-link/repa_cache
      "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/repa-site $(ls .whl/*.whl | grep -v "/setuptools-")
      cd /tmp && PYTHONPATH=/tmp/repa-site:/tmp/repa-link "$1" -c "import repa_cache.cli, zarr, numcodecs, diffusers, webdataset, distributed
print(\"repa_cache from\", repa_cache.__path__[0])"
    ' install_target "$PY"
    export PYTHONPATH=/tmp/repa-site:/tmp/repa-link${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

# the CUDA tests (on the CPU in the dry run); outcomes stream into tests.jsonl as they finish
step cuda_tests "$(budget cuda_tests)" env REPA_TEST_REPORT="$WORK/tests.jsonl" \
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/cuda -m cuda "${TEST_OPTS[@]}"

# the training step: cached / online / synthetic; the first run makes the inputs the others reuse
INPUTS=$WORK/ts-inputs
step train_b2 "$(budget train_b2)" "$PY" bench/train_step.py "${TS_OPTS[@]}" --model "$B2" --batch-size "$BATCH_B2" \
  --workdir "$INPUTS" --json "$WORK/train_b2.json"
reuse=()
if [ -f "$WORK/train_b2.json" ]; then
  reuse=(--cache "$INPUTS/cache" --images "$INPUTS/images")
fi
step train_xl2 "$(budget train_xl2)" "$PY" bench/train_step.py "${TS_OPTS[@]}" --model "$XL2" --batch-size "$BATCH_XL2" \
  "${reuse[@]}" --workdir "$WORK/ts-xl2" --json "$WORK/train_xl2.json"

# stage one: full-size SD-VAE and DINOv2-B architectures (random weights), fp32 and bf16
step encode_fp32 "$(budget encode_fp32)" --stdout "$WORK/encode_fp32.json" "$PY" bench/encode.py "${ENC_OPTS[@]}" --no-bf16
step encode_bf16 "$(budget encode_bf16)" --stdout "$WORK/encode_bf16.json" "$PY" bench/encode.py "${ENC_OPTS[@]}" --bf16

# the reader alone, with the trainer's default number of DataLoader workers on this machine
WORKERS=$("$PY" -c "
import torch
from repa_cache.train.loop import loader_workers
print(loader_workers(None, torch.device('$DEVICE'), 1))" 2>/dev/null || echo "")
[ -n "$WORKERS" ] || WORKERS=$([ "$DEVICE" = cuda ] && echo 8 || echo 2)
loader_cache=()
[ -f "$WORK/train_b2.json" ] && loader_cache=(--cache "$INPUTS/cache")
step loader "$(budget loader)" "$PY" bench/loader.py "${LOADER_OPTS[@]}" --teacher "$TEACHER" --workers "$WORKERS" \
  "${loader_cache[@]}" --workdir "$WORK/loader" --json "$WORK/loader.json"

# the same training steps through torch.compile (its compile time falls in the untimed warm-up)
step train_b2_compile "$(budget train_b2_compile)" "$PY" bench/train_step.py "${TS_OPTS[@]}" --model "$B2" --batch-size "$BATCH_B2" \
  --compile "${reuse[@]}" --workdir "$WORK/ts-b2c" --json "$WORK/train_b2_compile.json"
step train_xl2_compile "$(budget train_xl2_compile)" "$PY" bench/train_step.py "${TS_OPTS[@]}" --model "$XL2" --batch-size "$BATCH_XL2" \
  --compile "${reuse[@]}" --workdir "$WORK/ts-xl2c" --json "$WORK/train_xl2_compile.json"

# what HASTE's attention alignment adds to a step (teacher blocks 9-12 on cached hidden tokens)
step haste_xl2 "$(budget haste_xl2)" --stdout "$WORK/haste_xl2.json" "$PY" bench/haste_cost.py "${HASTE_OPTS[@]}"

# ------------------------------------------------------------------------------------------------
# one JSON with everything, one log, and the headline figures on stdout
for f in "$WORK"/logs/*.log; do
  [ -f "$f" ] || continue
  echo "===== $(basename "$f" .log) (last 300 lines) ====="
  tail -n 300 "$f"
done >"$OUTDIR/gpu_proof.log"

"$PY" - "$WORK" "$OUTDIR/gpu_proof.json" "$MODE" "$T0" "$BUDGET" "$WORKERS" <<'EOF'
import json, sys, time
from pathlib import Path

work, out, mode, t0, budget, workers = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])


def load(name):
    p = work / name
    if not p.is_file():
        return None
    text = p.read_text()
    try:
        return json.loads(text)
    except ValueError:
        try:  # a JSON document after other output: take the last '{' at a line start that parses
            starts = [i for i in range(len(text)) if text.startswith("{", i) and (i == 0 or text[i - 1] == "\n")]
            return next(json.loads(text[i:]) for i in starts if _parses(text[i:]))
        except StopIteration:
            return {"unparsed_tail": text[-2000:]}


def _parses(s):
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, secs, step_budget, cmd = line.split("\t", 4)
    steps[name] = {"exit": None if rc == "skipped" else int(rc), "skipped": rc == "skipped",
                   "timed_out": rc in ("124", "137"), "seconds": int(secs), "budget_s": int(step_budget), "command": cmd}

tests = []
if (work / "tests.jsonl").is_file():
    tests = [json.loads(x) for x in (work / "tests.jsonl").read_text().splitlines() if x.strip()]
counts = {}
for t in tests:
    counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1

env = load("env.json") or {}
train = {name: load(f"{name}.json") for name in ("train_b2", "train_xl2", "train_b2_compile", "train_xl2_compile")}
encode = {p: load(f"encode_{p}.json") for p in ("fp32", "bf16")}
loader = load("loader.json")
haste = load("haste_xl2.json")


def train_summary(res):
    if not res or "results" not in res:
        return None
    by = {r["path"]: r for r in res["results"]}
    s = {"model": res["info"].get("model"), "batch": res["info"].get("batch"), "compile": res["info"].get("compile"),
         "precision": res["info"].get("precision")}
    for path, r in by.items():
        if "error" in r:
            s[path] = r["error"]
            continue
        s[f"{path}_img_per_s"] = round(r["img_per_s"], 2)
        if "mfu" in r:
            s[f"{path}_mfu"] = round(r["mfu"], 4)
        if r.get("peak_mem_gib") is not None:
            s[f"{path}_peak_mem_gib"] = round(r["peak_mem_gib"], 2)
    s.update({k: round(v, 3) for k, v in res.get("ratios", {}).items()})
    return s


summary = {name: train_summary(res) for name, res in train.items()}
for p, res in encode.items():
    if res and "encode_img_per_s_all_views" in res:
        summary[f"encode_{p}"] = {k: res.get(k) for k in ("precision", "batch", "vae_img_per_s", "teacher_img_per_s",
                                                          "encode_img_per_s_all_views", "decode_crop_img_per_s_threaded")}
if loader and "results" in loader:
    rows = [r for r in loader["results"] if "samples_per_s" in r]
    summary["loader"] = [{"workers": r["workers"], "block": r["block"], "state": r["state"], "samples_per_s": round(r["samples_per_s"], 1),
                          "samples_per_s_per_worker": round(r["samples_per_s"] / max(1, r["workers"]), 1)} for r in rows]

if haste and "results" in haste:
    r = haste["results"]
    summary["haste_xl2"] = {"repa_img_per_s": round(r["repa"]["img_per_s"], 2), "haste_img_per_s": round(r["haste"]["img_per_s"], 2),
                            "haste_over_repa_time": round(r["haste_over_repa"], 3),
                            "haste_over_repa_flops": round(r.get("haste_over_repa_flops", float("nan")), 3)}


def check(value, target):
    return None if value is None else bool(value >= target)


def get(name, key):
    s = summary.get(name)
    return s.get(key) if isinstance(s, dict) else None


targets = {}
if mode == "gpu":
    best_xl = max([v for v in (get("train_xl2", "cached_img_per_s"), get("train_xl2_compile", "cached_img_per_s")) if v is not None], default=None)
    targets = {
        "cached_over_online_b2 >= 1.25": check(max([v for v in (get("train_b2", "cached_over_online"), get("train_b2_compile", "cached_over_online")) if v is not None], default=None), 1.25),
        "cached_over_online_xl2 >= 1.05": check(max([v for v in (get("train_xl2", "cached_over_online"), get("train_xl2_compile", "cached_over_online")) if v is not None], default=None), 1.05),
        "cached_over_synthetic >= 0.97 (every run)": (None if not [s for s in summary.values() if isinstance(s, dict) and "cached_over_synthetic" in s]
                                                      else all(s["cached_over_synthetic"] >= 0.97 for s in summary.values() if isinstance(s, dict) and "cached_over_synthetic" in s)),
        "sit_xl2_cached_img_per_s >= 350": check(best_xl, 350),
        "stage_one_img_per_s_both_views >= 700 (bf16)": check((summary.get("encode_bf16") or {}).get("encode_img_per_s_all_views"), 700),
    }

doc = {
    "mode": mode,
    "device": env.get("device"),
    "env": env,
    "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
    "wall_s": int(time.time()) - t0,
    "budget_s": budget,
    "loader_workers": workers,
    "steps": steps,
    "cuda_tests": {"counts": counts, "tests": tests},
    "summary": summary,
    "targets": targets,
    "train_step": train,
    "encode": encode,
    "loader": loader,
    "haste": haste,
}
out.write_text(json.dumps(doc, indent=1, default=str))
print(f"\n{mode} on {doc['device']}: {doc['wall_s']}s (budget {budget}s)")
for name, s in steps.items():
    state = "skipped" if s["skipped"] else ("TIMED OUT" if s["timed_out"] else f"exit {s['exit']}")
    print(f"  {name:18s} {state:10s} {s['seconds']:4d}s / {s['budget_s']}s")
print(f"  cuda tests: {counts or 'no outcomes recorded'}")
for t in tests:
    if t["outcome"] != "passed":
        print(f"    {t['outcome']}: {t['test']}")
print(json.dumps({"summary": summary, "targets": targets}, indent=1))
print(f"wrote {out}")
EOF
rc=$?
rm -rf "$WORK"
exit $rc
