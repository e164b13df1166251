#!/usr/bin/env bash
# The wheel works outside the repository: build it from the checkout's files, check what it holds
# (only m2pt_cli at the top, every file of m2pt_cli/, backbones/ and recipes/), install it WITHOUT -e
# into a fresh venv in a temporary folder, and from a folder outside the checkout list the bundled
# recipes, describe one by name, train the demo for two steps and score it on the demo bench.
# Called by .ci/run; alone: `. .venv/bin/activate && .ci/wheel_check.sh` (it reuses the active
# environment's dependencies and downloads nothing when that environment has setuptools >= 68).
#
# The fresh venv sees the active environment's site-packages through a plain path line in a .pth
# file, so that environment's editable m2pt (a .pth whose import hook maps m2pt_cli to the checkout)
# is never activated there: every m2pt_cli module must come from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$SECONDS
tmp=$(mktemp -d "${TMPDIR:-/tmp}/m2pt-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Build from a copy of the checkout's files (tracked and untracked, not ignored), as from a clean
# clone: nothing stale in build/ or *.egg-info gets in, and the checkout gets no build folders.
python - "$repo" "$tmp/src" <<'PY'
import shutil, subprocess, sys
from pathlib import Path

repo, src = Path(sys.argv[1]), Path(sys.argv[2])
listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, capture_output=True)
if listed.returncode != 0:
    sys.exit("wheel check: needs a git checkout (git ls-files names what a clean clone holds)")
for name in filter(None, listed.stdout.decode().split("\0")):
    if (repo / name).is_file():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, src / name)
PY
isolation=()
if python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)" 2>/dev/null; then
  isolation=(--no-build-isolation)
fi
pip wheel -q --no-deps "${isolation[@]}" -w "$tmp/dist" "$tmp/src"
wheel=$(ls "$tmp"/dist/m2pt-*.whl)
echo "wheel: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KB, built in $((SECONDS - start)) s)"

python - "$wheel" "$tmp/src" <<'PY'
import sys, zipfile
from pathlib import Path

wheel, src = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
top = {name.split("/")[0] for name in names}
assert {t for t in top if not t.endswith(".dist-info")} == {"m2pt_cli"}, f"top-level entries besides m2pt_cli: {top}"
wanted = set()
for folder, package in (("m2pt_cli", "m2pt_cli"), ("backbones", "m2pt_cli/backbones"), ("recipes", "m2pt_cli/bundled_recipes")):
    wanted |= {f"{package}/{p.relative_to(src / folder).as_posix()}" for p in (src / folder).rglob("*") if p.is_file()}
missing = sorted(wanted - names)
assert not missing, f"files of the repository missing from the wheel: {missing}"
print(f"wheel holds m2pt_cli only, with every file of m2pt_cli/, backbones/ and recipes/ ({len(names)} entries)")
PY

# A fresh venv that sees the active environment's packages (torch, transformers, ...) but none of its .pth hooks.
deps=$(python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
python -m venv --without-pip "$tmp/venv"
site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
echo "$deps" >"$site/_m2pt_check_deps.pth"
pip --python "$tmp/venv/bin/python" install -q --no-deps --no-index "$wheel"

mkdir "$tmp/work"
cd "$tmp/work"
export HF_HUB_OFFLINE=1
"$tmp/venv/bin/python" - "$site" "$repo" <<'PY'
import sys
from importlib import resources
from pathlib import Path

import m2pt_cli
import m2pt_cli.backbones.llava

site, repo = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
print("m2pt_cli imported from", m2pt_cli.__file__)
for path in (m2pt_cli.__file__, m2pt_cli.backbones.llava.__file__, str(resources.files("m2pt_cli.bundled_recipes"))):
    assert Path(path).resolve().is_relative_to(site), f"{path} is not from the installed wheel"
assert not any("__editable__" in name for name in sys.modules), "the checkout's editable install leaked in"
assert not any(Path(p or ".").resolve() == repo for p in sys.path), "the checkout is on sys.path"
try:
    import backbones  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("a top-level 'backbones' package is importable")
PY
m2pt=("$tmp/venv/bin/m2pt")
echo "== m2pt recipes (in $PWD)"
"${m2pt[@]}" recipes
echo "== m2pt info demo"
"${m2pt[@]}" info demo | head -3
echo "== m2pt train demo (2 steps)"
"${m2pt[@]}" train demo train.max_steps=2 train.global_batch_size=8 train.per_device_batch_size=8 \
  train.logging_steps=1 train.save_steps=2 train.eval_samples=8 --output-dir runs/demo
test -f runs/demo/adapter/adapter.safetensors
echo "== m2pt eval --bench demo"
"${m2pt[@]}" eval --bench demo --adapter runs/demo --limit 4 --output-dir runs/demo/eval
test -f runs/demo/eval/results.json
echo "wheel check passed in $((SECONDS - start)) s"
