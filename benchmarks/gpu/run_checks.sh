#!/usr/bin/env bash
# The GPU checks, in one script (CI has no GPU; run this on a machine with an NVIDIA GPU, from the
# repository root, with detr_lite's requirements importable by `python3`):
#
#   1. tests/test_cuda.py: the same numbers on the GPU as on the CPU (deformable attention forward,
#      gradients, gradcheck; the shipped toy DETR's AP table), and the GPU-only training paths
#      (--amp, --channels-last, --compile, --resume) end to end. Fails if any test was skipped.
#   2. notebooks/09_coco_training.ipynb for real (SMOKE = False) on a COCO-like fixture written in
#      the official layout (48 train / 16 val 640x480 images): the full-size ResNet-50 DETR and
#      Deformable DETR, 1 epoch each through the notebook's own torchrun launch, follow and
#      evaluation cells, AMP + channels_last, PRETRAINED_BACKBONE and (DETR) OFFICIAL_CHECKPOINT on
#      random stand-in files (stand_ins.py: nothing can be downloaded there). Executed notebooks are kept.
#   3. benchmarks: COCO training-step throughput (bench_coco_step.py), deformable attention
#      (bench_msda.py) and the matcher (bench_matcher.py) on the GPU.
#
# Logs and executed notebooks (8 files) go to $OUT (default runs/gpu_checks). If a folder $WHEELS
# (default .whl/) holds wheels (packages the GPU machine lacks), they are installed into /tmp/site
# first. For the H200 image (Python 3.12, no pycocotools/jupyter), made on a machine with pip:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform any -d .whl pycocotools nbclient ipykernel jupytext nbformat
# then delete the ones the image has (numpy packaging psutil pygments python_dateutil pyyaml
# typing_extensions attrs markdown_it_py mdurl): ~16 MB. Exit status: 0 only if every step passed.
set -uo pipefail
OUT=${OUT:-runs/gpu_checks}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MPLBACKEND=module://matplotlib_inline.backend_inline PYTHONUNBUFFERED=1 JUPYTER_PLATFORM_DIRS=1
status=0

step() {  # step NAME SECONDS COMMAND...: run (killed after SECONDS), log to $OUT/NAME.log, print its end
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name: $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-25}" "$OUT/$name.log"
    echo "--- $name: rc $rc, $(($(date +%s) - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| cuda', torch.version.cuda)"
echo "cpus $(nproc) | $(df -h /dev/shm | tail -1)"

# torch.compile last (below): cold, it recompiles for every new image size; on an H200 its test had
# not finished after 110-200 s (docs/COCO_TRAINING.md)
TAIL=40 step pytest 150 $PY -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider -k "not compile"
if grep -q "SKIPPED" "$OUT/pytest.log"; then
    echo "--- pytest: a CUDA test was skipped on a GPU machine"
    status=1
fi

# stand-ins for the downloads: a COCO-like fixture, a random "ImageNet" ResNet-50 in a scratch torch
# cache, a random official-layout DETR R50 (benchmarks/gpu/stand_ins.py)
export TORCH_HOME=/tmp/detr_lite_gpu_checks/torch_home
$PY benchmarks/gpu/stand_ins.py --coco /tmp/coco --official /tmp/detr-r50-random.pth || status=1
# the notebook polls the training log every 60 s; a check run polls every 5 s
FAST_FOLLOW='from detr_lite import launch as _l; _f = _l.follow; _l.follow = lambda *a, **k: _f(*a, **{**k, "every_s": 5})'
for arch in detr_r50 deformable_detr_r50; do
    # DataLoader workers in one run, the main process in the other; the official-checkpoint cell with DETR
    if [ $arch = detr_r50 ]; then workers=4 official="'/tmp/detr-r50-random.pth'"; else workers=0 official=None; fi
    step "nb09_$arch" 110 $PY benchmarks/gpu/run_notebook.py notebooks/09_coco_training.ipynb "$OUT/09_$arch.ipynb" \
        --prelude "$FAST_FOLLOW" -p SMOKE=False -p "ARCH='$arch'" -p "COCO_ROOT='/tmp/coco'" \
        -p "OUTPUT_DIR='/tmp/run_$arch'" -p EPOCHS=1 -p NUM_GPUS=1 -p NUM_WORKERS=$workers -p OFFICIAL_CHECKPOINT="$official"
done

TAIL=30 step bench_coco 90 $PY benchmarks/bench_coco_step.py --device cuda
TAIL=30 step bench_kernels 70 bash -c "$PY benchmarks/bench_msda.py --device cuda && $PY benchmarks/bench_matcher.py --device cuda"
TAIL=15 step pytest_compile 240 $PY -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider -k compile --durations=1
echo "=== GPU checks: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
