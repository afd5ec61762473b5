#!/usr/bin/env bash
# Download into .whl/ the wheels phi3v needs beyond what the GPU machine has, for its Python 3.12 on x86-64.
#
#   bash benchmarks/gpu/fetch_wheels.sh        (here, with network; then carry ".whl" in the device call)
#
# The GPU machine (KINDS.md, nvidia-h200) has torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15, peft,
# safetensors 0.8, tokenizers 0.23.2, huggingface_hub 1.33, numpy, pyyaml, tqdm, scikit-learn, matplotlib,
# tensorboard, pillow, pytest. It lacks:
#   transformers   phi3v needs >=5.23 (pyproject)
#   bitsandbytes   QLoRA; thinned here to its CUDA 13 and CPU libraries (43 MB -> about 3 MB), see below
#   levenshtein, rapidfuzz   phi3v.eval.metrics (ANLS)
#   peft           its version there is unrecorded and peft reaches into transformers' internals: carry the one
#                  CI runs with the carried transformers
# Versions come from constraints.txt at the repository root when it exists, else from `pip freeze` of $PYTHON
# (default: the python3 on PATH; use the project's CI environment). Every wheel is fetched with --no-deps; the
# script then checks the wheels' own requirements against the machine's recorded versions, and that the wheels
# plus the repository stay under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="${PYTHON:-python3}"
PACKAGES=(transformers bitsandbytes peft levenshtein rapidfuzz)
LIMIT_MIB=64

if [[ -f constraints.txt ]]; then
  pins="$(cat constraints.txt)"
  source_of_pins="constraints.txt"
else
  pins="$("$PY" -m pip freeze 2>/dev/null)"
  source_of_pins="pip freeze of $PY"
fi
specs=()
for name in "${PACKAGES[@]}"; do
  # case-insensitive, - and _ alike (PEP 503)
  line="$(printf '%s\n' "$pins" | grep -iE "^${name//[-_]/[-_]}==" | head -n1 || true)"
  if [[ -z "$line" ]]; then
    echo "fetch_wheels: no pinned version of $name in $source_of_pins" >&2
    exit 1
  fi
  specs+=("$line")
done
echo "fetch_wheels: ${specs[*]} (from $source_of_pins)"

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${specs[@]}"

# bitsandbytes ships a native library per CUDA/ROCm/XPU version (129 MB unpacked). The machine's torch is built
# for CUDA 13.0 and bitsandbytes picks the library of the same major version, so only libbitsandbytes_cuda13*.so
# (and the CPU one) stay; RECORD is rewritten to match, so the wheel stays valid.
"$PY" - <<'PYTHON'
import csv, glob, io, os, re, zipfile

for path in glob.glob(".whl/bitsandbytes-*.whl"):
    keep = re.compile(r"libbitsandbytes_(cuda13\d*|cpu)\.so$")
    drop = lambda name: re.search(r"libbitsandbytes_\w+\.so$", name) and not keep.search(name)
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not drop(n)]
        for name in names:
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and not drop(r[0])]
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerows(rows)
                data = out.getvalue().encode()
            dst.writestr(src.getinfo(name), data)
    os.replace(tmp, path)
    print(f"fetch_wheels: thinned {path} to {os.path.getsize(path) / 2**20:.1f} MiB "
          f"({sum(1 for n in names if n.endswith('.so'))} native libraries kept)")
PYTHON

# The wheels' own requirements against what the machine was seen to hold (KINDS.md, 2026-11); names it holds
# without a recorded version are reported, and checked there by run.sh's env step.
"$PY" - <<'PYTHON'
import glob, zipfile
from email.parser import Parser
from packaging.requirements import Requirement

machine = {"torch": "2.11.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "safetensors": "0.8.0",
           "accelerate": "1.15.0", "numpy": "2.5.2"}
carried = {}
for path in sorted(glob.glob(".whl/*.whl")):
    with zipfile.ZipFile(path) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    carried[meta["Name"].lower().replace("_", "-")] = (meta["Version"], meta.get_all("Requires-Dist") or [])
problems, unknown = [], set()
for name, (version, requires) in carried.items():
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        have = carried.get(key, (machine.get(key),))[0]
        if have is None:
            unknown.add(key)
        elif req.specifier and have not in req.specifier:
            problems.append(f"{name} {version} needs {req}, the machine has {have}")
print("fetch_wheels: carried " + ", ".join(f"{n}=={v}" for n, (v, _) in sorted(carried.items())))
print("fetch_wheels: requirements with no recorded version on the machine (checked there): " + ", ".join(sorted(unknown)))
if problems:
    raise SystemExit("fetch_wheels: " + "; ".join(problems) + " -- add those packages to PACKAGES")
PYTHON

wheels=$(du -cb .whl/*.whl | tail -n1 | cut -f1)
repo=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null || true) | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((wheels + repo))
printf 'fetch_wheels: wheels %.1f MiB + repository %.1f MiB = %.1f MiB of %d MiB\n' \
  "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$repo / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if ((total > LIMIT_MIB * 1048576)); then
  echo "fetch_wheels: over the device tool's ${LIMIT_MIB} MiB" >&2
  exit 1
fi
ls -l .whl
