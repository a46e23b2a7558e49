#!/usr/bin/env bash
# Every job once at its defaults on this machine, local Ray, real (NFCorpus) inputs: the check
# to run after merging branches (a default that deadlocks shows up here, not in review).
# Usage: bench/defaults_smoke.sh [REPO] [PYTHON]   (prints rc and seconds per job)
set -u
REPO=${1:-/work/main}; PY=${2:-$REPO/.venv/bin/python}
O=$(mktemp -d /tmp/defaults.XXXX); D=$O/data
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_ADDRESS=local
cd "$REPO"
$PY bench/defaults_data.py "$D" || exit 1
run() { local name=$1; shift; local t0=$(date +%s); timeout 900 "$@" > "$O/$name.log" 2>&1; local rc=$?; echo "$name rc=$rc $(( $(date +%s)-t0 ))s  log=$O/$name.log"; }
run embed      $PY pipelines/embed_corpus.py --output $O/emb
run retromae   $PY pipelines/pretrain_retromae.py --model_name_or_path all-MiniLM-L6-v2 --train_data $D/raw.jsonl --output_dir $O/rm --max_steps 20 --per_device_train_batch_size 8 --max_seq_length 128 --num_workers 1
run finetune   $PY pipelines/finetune.py --model_name_or_path all-MiniLM-L6-v2 --train_data $D/train.jsonl --output_dir $O/ft
run mine       $PY pipelines/mine_hard_negatives.py --model_name_or_path all-MiniLM-L6-v2 --input_file $D/train.jsonl --output_file $O/mined.jsonl
run evaluate   $PY pipelines/evaluate.py --model $O/ft --beir_dir $D/beir --split test --output $O/metrics.json
run recipe     $PY pipelines/recipe.py --corpus $D/raw.jsonl --train_data $D/train.jsonl --beir_dir $D/beir --output_dir $O/recipe
( $PY pipelines/serve_embeddings.py --port 8321 > $O/serve.log 2>&1 & echo $! > $O/serve.pid )
for i in $(seq 1 120); do curl -sf http://127.0.0.1:8321/health >/dev/null 2>&1 && break; sleep 2; done
curl -s http://127.0.0.1:8321/v1/embeddings -H 'Content-Type: application/json' -d '{"input":["hello world"],"input_type":"query"}' | head -c 200; echo
echo "serve health: $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8321/health)"
kill -INT $(cat $O/serve.pid); sleep 10; kill -9 $(cat $O/serve.pid) 2>/dev/null
$PY pipelines/serve_embeddings.py --host 0.0.0.0 --port 8322 > $O/serve_open.log 2>&1 & SP=$!; sleep 20; kill -9 $SP 2>/dev/null && echo "serve 0.0.0.0 without key: still running (BAD)" || echo "serve 0.0.0.0 without key exited: $(tail -1 $O/serve_open.log)"
echo "outputs in $O"
