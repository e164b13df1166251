#!/usr/bin/env bash
# The distributed engines on a GPU machine (what CPU tests cannot run; see docs/incoming/dist.md):
# the tiny LLaVA trained 8 steps by one process, then by DeepSpeed ZeRO-2 and ZeRO-3 (the shipped
# recipes/deepspeed/*.json) and, with 2 or more GPUs, by FSDP2 (train.fsdp=true); each adapter is
# compared with the single-process one. Needs CUDA and `pip install deepspeed` in the active
# environment (the check says which is missing). Usage: .ci/gpu_engines.sh [WORK_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$gpus" -ge 1 ] || { echo "gpu_engines: no CUDA device here"; exit 2; }
python - "$work" <<'PY'
import sys, yaml
from pathlib import Path
from m2pt_cli.backbones._tiny import save_tiny_llava, tiny_llava_config
work = Path(sys.argv[1])
save_tiny_llava(work / "tiny", tiny_llava_config(), seed=1)
recipe = {
    "name": "tiny-engines", "seed": 5,
    "model": {"backbone": "llava", "name_or_path": str(work / "tiny"), "dtype": "float32"},
    "prompts": {"vision": {"length": 2}, "text": {"length": 2}},
    "data": {"sources": [{"format": "digits", "limit": 96}], "eval_size": 16, "max_length": 96},
    "train": {"max_steps": 8, "learning_rate": 5e-3, "global_batch_size": 8, "per_device_batch_size": 8,
              "precision": "fp32", "gradient_checkpointing": False, "logging_steps": 1, "save_steps": 4,
              "eval_samples": 0, "warmup_ratio": 0.1},
}
(work / "tiny.yaml").write_text(yaml.safe_dump(recipe))
PY
launch() {  # launch NPROC RUN OVERRIDES...
  local n=$1 run=$2; shift 2
  python -m torch.distributed.run --nproc_per_node "$n" --master_port 29561 -m m2pt_cli train "$work/tiny.yaml" \
    "train.per_device_batch_size=$((8 / n))" "$@" --output-dir "$work/$run" 2>"$work/$run.log" \
    || { tail -20 "$work/$run.log"; echo "gpu_engines: $run FAILED"; exit 1; }
  grep -o "training on .*" "$work/$run.log" | head -1 || true
}
compare() {  # compare RUN: the adapter equals the single-process one within 1e-4 (GPU reductions differ),
  # and its checkpoints hold no base weights (m2pt's checkpoints are adapter-only)
  python - "$work/single/adapter/adapter.safetensors" "$work/$1/adapter/adapter.safetensors" "$1" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
run = Path(sys.argv[2]).parents[1]
heavy = [p.name for c in run.glob("checkpoint-*") for p in c.iterdir() if p.name.startswith(("pytorch_model", "model"))]
print(f"{sys.argv[3]}: checkpoint files {sorted({p.name for c in run.glob('checkpoint-*') for p in c.iterdir()})}")
assert not heavy, f"{sys.argv[3]}: checkpoints hold model weights {heavy}"
one, other = load_file(sys.argv[1]), load_file(sys.argv[2])
assert set(one) == set(other), (sorted(one), sorted(other))
gap = max((one[k] - other[k]).abs().max().item() for k in one)
print(f"{sys.argv[3]}: largest difference from one process {gap:.2e}")
assert gap <= 1e-4, f"{sys.argv[3]}: adapter differs from one process by {gap}"
PY
}
python -m m2pt_cli train "$work/tiny.yaml" --output-dir "$work/single" >/dev/null
n=$(( gpus >= 2 ? 2 : 1 ))
if python -c "import deepspeed" 2>/dev/null; then
  for stage in zero2 zero3; do launch "$n" "$stage" "train.deepspeed=$stage"; compare "$stage"; done
else
  echo "gpu_engines: deepspeed is not installed here (pip install deepspeed): ZeRO-2/3 NOT checked"
fi
if [ "$gpus" -ge 2 ]; then
  launch 2 fsdp "train.fsdp=true"; compare fsdp
else
  echo "gpu_engines: FSDP needs 2 GPUs to shard (found $gpus): NOT checked"
fi
echo "gpu_engines: done ($work)"
