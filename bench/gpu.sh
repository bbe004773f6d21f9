#!/usr/bin/env bash
# Issue 10's GPU figures in one call: each part under its own time limit, so that a part that fails or
# overruns leaves the others' figures. Every part writes its log (and JSON where it has one) into OUTDIR.
#
#     bench/gpu.sh OUTDIR
#
# 1. bench/run.py at full scale, 512x512: seconds per image for each mode against the reference loop in the
#    same run, peak GPU memory, robust off, and low_vram (the issue's "< 6 GB").
# 2. bench/batch_queue.py at full scale: a real `fixative run` draining 16 images of 512x512 at the product's
#    100 steps, one at a time against batches of 4 (images per hour).
# 3. bench/batching.py at full scale: the engine's PGD alone, batches of 1, 4, 8 and 16 (seconds per image,
#    peak GPU memory).
# Results and the card they came from: bench/README.md, "On a GPU".
set -u
out=${1:?usage: bench/gpu.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: run one part, its output to OUTDIR/NAME.log, and say how it ended
    local name=$1 seconds=$2
    shift 2
    local started=$SECONDS
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s (limit $seconds s)" | tee -a "$out/parts.txt"
}

part full 270 python3 bench/run.py --scale full --sizes 512x512 --no-quality \
    --modes sds,advdm,mist,encoder,sds+robust=false,sds+low_vram,advdm+low_vram --json "$out/full.json"
part queue 180 python3 bench/batch_queue.py --scale full --device cuda --images 16 --steps 100 --rounds 1 --batch-size 4
part batching 90 python3 bench/batching.py --scale full --device cuda --batches 1,4,8,16 --steps 10 --rounds 2 \
    --json "$out/batching.json"

# The tables, last, so that they are what a short tail of the output shows.
grep -v "^    " "$out/full.log" | tail -n 25
tail -n 6 "$out/queue.log"
tail -n 9 "$out/batching.log"
cat "$out/parts.txt"
