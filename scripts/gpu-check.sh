#!/usr/bin/env bash
# The GPU check of issue 17 (bench/gpu.py): the CUDA tests and the figures, on a CUDA host that reaches no registry.
#   scripts/gpu-check.sh wheels     here, once: the service's pure-Python dependencies that a stock PyTorch image
#                                   lacks, as cp312 wheels in .whl/ (the versions of ./.venv, about 6 MB)
#   scripts/gpu-check.sh slim       here: .gpu-models/, an MNIST-only registry (its manifest, and a link to
#                                   models/mnist) without the paper tables' extra models (classifier_<X>_{adv,ens,pgd}0.3
#                                   but A_adv0.3, B/C_adv0.15, classifier_<X>_rec, advgan_<X>_*), for a copy of the tree
#                                   with models/fmnist and the files it prints set aside (the whole tree is ~160 MiB, over
#                                   a 64 MiB transfer limit; so slimmed it is ~45 MiB)
#   scripts/gpu-check.sh [OUTDIR]   there: installs .whl/ (offline) into /tmp/site if present, uses .gpu-models/ if
#                                   present, then runs bench/gpu.py with that host's python3 (its CUDA torch) into
#                                   OUTDIR (default: $OUT, else runs/gpu); further arguments go to bench/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MISSING=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv uvicorn python-multipart
         swagger-ui-bundle annotated-types typing-inspection)
case "${1:-}" in
  wheels)
    pins=$(.venv/bin/python -m pip freeze | awk -F== -v names="${MISSING[*]}" '
      BEGIN { n = split(names, a, " "); for (i = 1; i <= n; i++) want[a[i]] = 1 }
      { k = tolower($1); gsub(/_/, "-", k); if (k in want) print k "==" $2 }')
    # shellcheck disable=SC2086  # one argument per pin
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
    ls -1 .whl
    exit 0 ;;
  slim)
    rm -rf .gpu-models && mkdir .gpu-models && ln -s ../models/mnist .gpu-models/mnist
    .venv/bin/python -c '
import json, sys
m = json.load(open("models/manifest.json"))
import re
table = re.compile(r"mnist/(classifier_[BC]_adv0\.(3|15)|classifier_[ABC]_(ens|pgd)0\.3|classifier_[A-D]_rec"
                   r"|advgan_.+_.+)$")
aside = [f["path"] for k, v in m["artifacts"].items() if table.match(k) for f in v["files"].values()]
m["artifacts"] = {k: v for k, v in m["artifacts"].items() if k.startswith("mnist/") and not table.match(k)}
json.dump(m, open(".gpu-models/manifest.json", "w"), indent=2)
measured = json.load(open("models/measured.json"))
measured["artifacts"] = {k: v for k, v in measured["artifacts"].items() if k in m["artifacts"]}
measured["defaults"] = {k: v for k, v in measured["defaults"].items() if k == "mnist"}
json.dump(measured, open(".gpu-models/measured.json", "w"), indent=2)
print(len(m["artifacts"]), "mnist artifacts in .gpu-models/; set aside for a device run: models/fmnist",
      *("models/" + p for p in aside))'
    exit 0 ;;
esac
out=${1:-${OUT:-runs/gpu}}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f .gpu-models/manifest.json ] && export MG_MODELS_DIR=$PWD/.gpu-models
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu --out "$out" "${@:2}"
