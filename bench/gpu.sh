#!/usr/bin/env bash
# The GPU figures: each part under its own time limit, so that a part that fails or overruns leaves
# the others' figures. Every part writes its log (and JSON where it has one) into OUTDIR.
#
#     bench/gpu.sh OUTDIR [full] [batching] [queue]     (no part named: all three, about 12 minutes)
#
# full      bench.run at full scale, 512x512: seconds per image for each mode against the reference loop
#           in the same run, peak GPU memory, robust off, coarse to fine off, and low_vram (whether
#           it fits a 6 GB card). About 3 minutes on an H200.
# batching  bench.batching at full scale: the engine's PGD alone, batches of 1, 4, 8 and 16 (seconds per
#           image, peak GPU memory). Under a minute.
# queue     bench.batch_queue at full scale: a real `fixative run` draining 16 images of 512x512 at the
#           product's 100 steps, one at a time against batches of 4 (images per hour). Up to 7 minutes:
#           one at a time took 103 and 157 s of images on two H200s, plus the model's saving and two
#           daemons' starts. A device call is at most 10 minutes, so give it a call of its own.
# Results and the card they came from: bench/README.md, "On a GPU".
set -u
out=${1:?usage: bench/gpu.sh OUTDIR [full] [batching] [queue]}
shift
parts=${*:-full batching queue}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: run one part if it was asked for, its output to OUTDIR/NAME.log
    local name=$1 seconds=$2
    shift 2
    [[ " $parts " == *" $name "* ]] || return 0
    local started=$SECONDS
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s (limit $seconds s)" | tee -a "$out/parts.txt"
}

part full 300 python3 -m bench.run --scale full --sizes 512x512 --no-quality --json "$out/full.json" \
    --modes sds,advdm,mist,encoder,sds+robust=false,sds+coarse_to_fine=false,sds+low_vram,advdm+low_vram
part batching 90 python3 -m bench.batching --scale full --device cuda --batches 1,4,8,16 --steps 10 --rounds 2 \
    --json "$out/batching.json"
part queue 420 python3 -m bench.batch_queue --scale full --device cuda --images 16 --steps 100 --rounds 1 --batch-size 4

# The tables, last, so that they are what a short tail of the output shows.
for name in full batching queue; do
    [[ -f "$out/$name.log" ]] || continue
    grep -v -e "^    " -e "Writing model shards" -e "kept in float32" "$out/$name.log" | tail -n 25
done
[[ -f "$out/parts.txt" ]] && cat "$out/parts.txt"
