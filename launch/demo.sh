#!/usr/bin/env bash
# `make demo`: the whole pipeline end to end on text already on this machine; no network, no files
# fetched. Everything goes under runs/demo/: data/, run/ (the run directory), export/.
#
#   corpus (local docs) -> WordPiece tokenizer -> shards -> EarlyBERT pre-training on 2 ranks
#   (deepspeed launcher, ZeRO-2) -> early-bird ticket -> prune -> rebuild -> finish -> export -> report
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=runs/demo/run
DATA=runs/demo/data
EXPORT=runs/demo/export   # beside the run, never inside it (export refuses that: common/outputs.py)
mkdir -p "$DATA"
start=$(date +%s)

overrides=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # GPUs: the headline model, bf16, every GPU of the node. 256 sequences a step, at most 64 per GPU: the run
    # picks the split for the GPUs it finds (8 GPUs: 32 x 8, 4: 64 x 4, 1: 64 x 4 accumulation) and says it.
    overrides+=(model.preset=bert-large deepspeed=ds_configs/zero2_bf16.json micro_batch_size=64 global_batch_size=256)
    NGPU=$(nvidia-smi -L | grep -c '^GPU')
else
    NGPU=2   # CPU: 2 ranks over gloo
fi

echo "== 1/6 corpus: text already on this machine (docstrings and docs of Python and its packages)"
[ -s "$DATA/corpus.txt" ] || $PY -m data_prep local-corpus --output "$DATA/corpus.txt" --max-mb 12
echo "== 2/6 WordPiece tokenizer"
[ -s "$DATA/tokenizer.json" ] || $PY -m data_prep tokenizer --input "$DATA/corpus.txt" --output "$DATA/tokenizer.json" \
    --vocab-size 8000 --lowercase
echo "== 3/6 shards (seq 128, sentence pairs with next-sentence labels)"
$PY -m data_prep --input "$DATA/corpus.txt" --output "$DATA/seq128" --tokenizer "$DATA/tokenizer.json" --seq-len 128 --no-progress

echo "== 4/6 EarlyBERT pre-training: search, draw, prune, rebuild, finish ($NGPU ranks, deepspeed launcher)"
.venv/bin/deepspeed --num_gpus "$NGPU" --master_port "${MASTER_PORT:-29533}" --module pipeline.train \
    --config launch/configs/demo.yaml "${overrides[@]}"

echo "== 5/6 export to a Hugging Face directory"
$PY -m pipeline.cli export "$RUN" --output "$EXPORT"
echo "== 6/6 report"
$PY -m pipeline.cli report "$RUN"

cat <<DONE

demo finished in $(( $(date +%s) - start )) s. Everything is under runs/demo/:
  $DATA/                corpus, tokenizer, shards
  $RUN/metrics.jsonl    one line per optimizer step
  $RUN/ticket.json      the early-bird ticket: draw step, kept heads and FFN widths per layer
  $RUN/checkpoints/     DeepSpeed checkpoints (relaunching resumes from the latest)
  $RUN/report/report.md the report, with figures
  $EXPORT/              Hugging Face model directory (AutoModelForPreTraining, trust_remote_code=True)
DONE
