#!/usr/bin/env bash
# The main job, end to end, on CPU, with nothing downloaded:
#   make a tiny Falcon -> convert -> build -> run -> summarize (engine and transformers, ROUGE).
#
#   examples/demo.sh [WORK_DIR]        (default: a fresh temporary directory)
#   VARIANT=rw examples/demo.sh        (rw | 7b | 40b | 180b | falcon2; default 7b)
#
# The model has random weights, so its text is gibberish; what the demo shows is the workflow
# and that the engine reproduces transformers token for token (summarize's engine_vs_hf scores).
set -euo pipefail

WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/modelc-demo.XXXXXX")}
VARIANT=${VARIANT:-7b}
MODELC=${MODELC:-modelc}
mkdir -p "$WORK"

step() {
  printf '\n==> %s\n$' "$1"
  printf ' %q' "${@:2}"
  printf '\n'
  "${@:2}"
}

step "1/5 Make a tiny random-weight Hugging Face Falcon ($VARIANT layout) and train its tokenizer locally" \
  "$MODELC" tiny-falcon --output_dir "$WORK/hf" --variant "$VARIANT" --num_layers 2

step "2/5 Convert it to a modelc checkpoint (config.json + rank0.safetensors)" \
  "$MODELC" convert --model_dir "$WORK/hf" --output_dir "$WORK/ckpt" --dtype float32

step "3/5 Build a torch engine with run-time limits" \
  "$MODELC" build --checkpoint_dir "$WORK/ckpt" --output_dir "$WORK/engine" \
  --max_batch_size 4 --max_input_len 512 --max_seq_len 640

step "4/5 Generate from two prompts as one batch (greedy, KV cache, left padding)" \
  "$MODELC" run --engine_dir "$WORK/engine" --device cpu --max_output_len 24 \
  --input_text "The river ran slowly past the old mill" --input_text "Cooking rice well" \
  --output_json "$WORK/run.json"

step "5/5 Summarize the shipped sample articles with the engine and with transformers; score ROUGE" \
  "$MODELC" summarize --engine_dir "$WORK/engine" --hf_model_dir "$WORK/hf" --test_trt_llm --test_hf \
  --device cpu --max_ite 4 --output_len 32 --max_input_length 256 --output_json "$WORK/summarize.json"

cat <<DONE

Done. What the demo made, all under $WORK:
  hf/              tiny Hugging Face Falcon ($VARIANT layout, random weights) + tokenizer trained on modelc's corpus
  ckpt/            modelc checkpoint (config.json, rank0.safetensors, tokenizer/)
  engine/          torch engine (config.json with the IR and build limits, rank0.safetensors, tokenizer/)
  run.json         generated token ids and text of the two prompts
  summarize.json   ROUGE-1/2/L/Lsum, latency and tokens/s of the engine and of transformers, and their agreement
DONE
