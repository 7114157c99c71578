#!/usr/bin/env bash
# The GPU check (issue 32, section 6): one command, at most 10 minutes on one H100, on the device tool.
#
#   1. the opt-in GPU tests:            pytest -m gpu tests/model/test_gpu.py
#   2. one real Qwen2.5-VL-7B-shaped SRPO step (random bf16 weights, 4-bit base, 1,024-token prompts,
#      2,048-token responses, G=8) under a 24 GiB cap, with torch.cuda.max_memory_allocated per phase set
#      against `lite-srpo plan` (bench/gpu_7b.py --phase build ours --steps 1);
#   3. rollout tokens/s of that step (perf/gen_tokens_per_s);
#   4. the same recipe traced at real shapes on meta tensors (`lite-srpo plan --trace`, no GPU needed),
#      printed beside the measured phase peaks: measured vs traced vs planned.
#
# On the device tool (name .whl in carry; bench/gpu_wheels.md says how to fill it):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Results land in $OUT (the tool's return folder) or bench/results/gpu_check/; copy them into bench/results/.
# CHECK_DRY=1 bash bench/gpu_check.sh runs the same steps on CPU at tiny shapes, to check the script itself.
set -u
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
if [ -d .whl ] && [ -z "${CHECK_DRY:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "gpu_check: wheel install failed" >&2; exit 1; }
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
start=$(date +%s)
$PY - <<'PY' | tee "$OUT/machine.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY

echo "== 1. pytest -m gpu"
timeout 150 $PY -m pytest -q -m gpu -o addopts="" -p no:cacheprovider tests/model/test_gpu.py 2>&1 | tail -15 \
  | tee "$OUT/pytest_gpu.txt"

echo "== 2-3. one 7B-shaped SRPO step against the plan"
if [ -n "${CHECK_DRY:-}" ]; then
  timeout 400 $PY -m bench.gpu_7b --dry-run --phase build ours --steps 1 --results-dir "$OUT" 2>&1 | tail -20
else
  timeout 400 $PY -m bench.gpu_7b --phase build ours --shape 7b --steps 1 --results-dir "$OUT" 2>&1 | tail -20
fi

echo "== 4. the recipe traced at real shapes (meta tensors)"
TRACE_RECIPE=recipes/qwen2_5_vl_7b_srpo_24gb.yaml
[ -n "${CHECK_DRY:-}" ] && TRACE_RECIPE=recipes/qwen2_5_vl_3b_srpo_24gb.yaml
timeout 120 $PY -m lite_srpo plan "$TRACE_RECIPE" --trace --json > "$OUT/trace.json" 2> "$OUT/trace.err" \
  || echo "gpu_check: the trace did not finish ($(tail -1 "$OUT/trace.err"))"

$PY - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("gpu_*.json")):
    ours = json.loads(f.read_text()).get("ours", {})
    planned = ours.get("planned", {})
    print(f.name, "fits:", ours.get("fits"), "error:", str(ours.get("error", ""))[-300:] or None)
    print("  measured peaks GiB:", {k: v for k, v in ours.items() if "peak" in k and k != "phase_peaks"})
    print("  planned peak GiB:", planned.get("peak_gib"), "needed on the card:", planned.get("needed_gib"),
          "planned phases:", planned.get("phases"))
    print("  measured phase peaks:", ours.get("phase_peaks"))
    print("  rollout tokens/s:", ours.get("perf/gen_tokens_per_s"), "step s:", ours.get("time/step"))
trace = Path(sys.argv[1]) / "trace.json"
if trace.is_file() and trace.stat().st_size:
    t = json.loads(trace.read_text())
    print("traced phases GiB (meta tensors, no kernels' workspaces):",
          {k: v["traced_gib"] for k, v in t["phases"].items()}, "planned:", {k: v["planned_gib"] for k, v in t["phases"].items()})
PY
echo "gpu_check: $(( $(date +%s) - start )) s"
