#!/usr/bin/env bash
# The README's Quickstart and "Use" examples, as written, run from an installed package (not this checkout), timed.
#   python -m venv /tmp/venv && /tmp/venv/bin/pip install torch==2.13.0 .   # then, from any folder:
#   PATH=/tmp/venv/bin:$PATH bash /path/to/bench/readme_examples.sh /tmp/readme
set -u
work=${1:-/tmp/readme}
mkdir -p "$work" && cd "$work" && rm -rf out dense.json
run() { echo "=== \$ $*"; local t0=$(date +%s); "$@"; echo "=== rc=$? in $(( $(date +%s) - t0 )) s"; }
run sparsefx demo --quick
run sparsefx recipes
run sparsefx compress smollm2 -r wanda-2of4 -o out/w24
run sparsefx eval out/w24
run sparsefx eval smollm2 --no-speed --json dense.json
run sparsefx eval out/w24 --tasks arc_easy,piqa,winogrande --limit 200
run sparsefx compress smollm2 -r daws-50-mt3-banded -o out/daws50
run sparsefx compress smollm2 -r rtn-w3-g64 -o out/rtn3
run sparsefx eval out/daws50 --compile
run sparsefx eval out/daws50 --decode-path --tokens 4096
run sparsefx eval out/rtn3 --decode-path --int8-activations --tokens 4096
run sparsefx compress smollm2 -r gisp-nested-40 -o out/gisp
run sparsefx eval out/gisp --level 0.2
run sparsefx export out/gisp --level 0.2 -o out/gisp20
run sparsefx demo --quick --json demo.json
run sparsefx plot demo.json -o sparsity.png
run sparsefx demo
cat > api.py <<'PY'
# The README's Python example, as written (model.generate(...) given real arguments)
import sparsefx
from sparsefx.data import calibration_batches

model, tok = sparsefx.load_model("smollm2")            # or a local HF folder
recipe = sparsefx.Recipe.from_yaml("""
passes:
  - method: wanda
    sparsity: 0.5
    overrides: {"*.self_attn.*": 0.3}                  # per-layer: glob over parameter names -> sparsity or "N:M"
""")
result = sparsefx.compress(model, recipe, calibration=calibration_batches(tok))
ids = tok("The capital of France is", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0]))
sparsefx.save_artifact("out/w50", model, tok, recipe, result.report_dict())
model = sparsefx.load("out/w50")
print(tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0]))

import torch
model = sparsefx.load("out/daws50")                   # compressed modules call sparsefx::* ops
model.forward = torch.compile(model.forward, backend="sparsefx")
print(tok.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))
dense = sparsefx.load_model("smollm2")[0]
fast = torch.compile(dense, backend="sparsefx", options={"artifact": "out/daws50"})
print(tok.decode(fast.generate(ids, max_new_tokens=8, do_sample=False)[0]))
PY
run python api.py
