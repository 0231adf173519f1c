#!/usr/bin/env bash
# The main job, end to end, on CPU, with nothing downloaded:
#   train a tiny Falcon on modelc's corpus -> convert -> build -> run -> summarize (engine and
#   transformers, ROUGE) -> quantize to FP8 and INT4-AWQ and score their agreement with full
#   precision -> serve the engine over HTTP and send it one request.
#
#   examples/demo.sh [WORK_DIR]        (default: a fresh temporary directory)
#   VARIANT=rw examples/demo.sh        (rw | 7b | 40b | 180b | falcon2; default 7b)
#
# The model is tiny (2 layers, 128 wide) and trained for about half a minute, so its text is
# English-like rather than sensible: real words and plausible phrases, and ROUGE above zero.
# Training is deterministic and cached ($MODELC_CACHE_DIR, else ~/.cache/modelc): a second run
# skips it.
set -euo pipefail

WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/modelc-demo.XXXXXX")}
VARIANT=${VARIANT:-7b}
MODELC=${MODELC:-modelc}
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK"

title() { printf '\n==> %s\n' "$1"; }
print_command() {
  printf '$'
  printf ' %q' "$@"
  printf '\n'
}
show() {
  print_command "$@"
  "$@"
}

title "1/8 Make a tiny Hugging Face Falcon ($VARIANT layout) trained on modelc's corpus, with its tokenizer"
show "$MODELC" tiny-falcon --output_dir "$WORK/hf" --variant "$VARIANT" --num_layers 2 --trained

title "2/8 Convert it to a modelc checkpoint (config.json + rank0.safetensors)"
show "$MODELC" convert --model_dir "$WORK/hf" --output_dir "$WORK/ckpt" --dtype float32

title "3/8 Build a torch engine with run-time limits"
show "$MODELC" build --checkpoint_dir "$WORK/ckpt" --output_dir "$WORK/engine" \
  --max_batch_size 4 --max_input_len 256 --max_seq_len 320

title "4/8 Generate from two prompts as one batch (greedy, KV cache, left padding)"
show "$MODELC" run --engine_dir "$WORK/engine" --device cpu --max_output_len 24 \
  --input_text "The river ran slowly past the old mill, and" --input_text "In the morning the village" \
  --output_json "$WORK/run.json"

title "5/8 Summarize the shipped sample articles with the engine and with transformers; score ROUGE"
show "$MODELC" summarize --engine_dir "$WORK/engine" --hf_model_dir "$WORK/hf" --test_trt_llm --test_hf \
  --device cpu --batch_size 4 --max_ite 2 --output_len 32 --max_input_length 128 --output_json "$WORK/summarize.json"

title "6/8 Quantize to FP8 (weights, activations, KV cache) and to INT4-AWQ, calibrated on the corpus; build both"
show "$MODELC" quantize --model_dir "$WORK/hf" --output_dir "$WORK/ckpt-fp8" --qformat fp8 --kv_cache_dtype fp8 \
  --calib_size 16 --calib_max_seq_length 128 --batch_size 4 --device cpu
show "$MODELC" quantize --model_dir "$WORK/hf" --output_dir "$WORK/ckpt-int4_awq" --qformat int4_awq \
  --calib_size 16 --calib_max_seq_length 128 --batch_size 4 --device cpu
for QFORMAT in fp8 int4_awq; do
  show "$MODELC" build --checkpoint_dir "$WORK/ckpt-$QFORMAT" --output_dir "$WORK/engine-$QFORMAT" \
    --max_batch_size 4 --max_input_len 256 --max_seq_len 320
done

title "7/8 Summarize with each quantized engine; agreement = ROUGE of its summaries against full-precision transformers'"
for QFORMAT in fp8 int4_awq; do
  show "$MODELC" summarize --engine_dir "$WORK/engine-$QFORMAT" --hf_model_dir "$WORK/hf" --test_trt_llm --test_hf \
    --device cpu --batch_size 4 --max_ite 2 --output_len 32 --max_input_length 128 \
    --output_json "$WORK/summarize-$QFORMAT.json" >/dev/null
done
"$PYTHON" - "$WORK" <<'TABLE'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
print(f"{'engine':<16}{'ROUGE-1 vs reference':>22}{'agreement with full precision: ROUGE-1':>42}{'ROUGE-2':>9}")
for name in ("full precision", "fp8", "int4_awq"):
    file = "summarize.json" if name == "full precision" else f"summarize-{name}.json"
    scores = json.loads((work / file).read_text())
    agreement = scores["engine_vs_hf"]
    print(f"{name:<16}{scores['engine']['rouge1']:>22.2f}{agreement['rouge1']:>42.2f}{agreement['rouge2']:>9.2f}")
TABLE
echo "(Greedy summaries drift apart after their first differing token, so agreement stays well below 100;"
echo " two unrelated summaries of this model agree at about ROUGE-1 28, ROUGE-2 6.)"

title "8/8 Serve the engine over an OpenAI-compatible HTTP API and send it one request"
if ! command -v curl >/dev/null; then
  echo "skipped: curl is not installed"
else
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  print_command "$MODELC" serve --engine_dir "$WORK/engine" --port "$PORT" --device cpu
  "$MODELC" serve --engine_dir "$WORK/engine" --port "$PORT" --device cpu >"$WORK/serve.log" 2>&1 &
  SERVER=$!
  trap 'kill "$SERVER" 2>/dev/null || true' EXIT
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
    sleep 0.5
  done
  # Greedy, as step 4 ran it: the reply's text is step 4's first output.
  show curl -sS -o "$WORK/serve.json" "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "The river ran slowly past the old mill, and", "max_tokens": 24, "temperature": 0}'
  cat "$WORK/serve.json"
  echo
  kill -TERM "$SERVER"
  wait "$SERVER"
  trap - EXIT
fi

cat <<DONE

Done. What the demo made, all under $WORK:
  hf/                   tiny Hugging Face Falcon ($VARIANT layout) trained on modelc's corpus, + its tokenizer
  ckpt/ engine/         modelc checkpoint and torch engine at full precision (float32)
  ckpt-fp8/ engine-fp8/ FP8 checkpoint (weights, activations, KV cache) and its engine
  ckpt-int4_awq/ engine-int4_awq/  INT4-AWQ checkpoint and its engine
  run.json              generated token ids and text of the two prompts
  summarize*.json       ROUGE-1/2/L/Lsum, latency and tokens/s of each engine and of transformers, and their agreement
DONE
