#!/usr/bin/env bash
# SmolLM2-135M from the Hub and back: compress on load (20% pruning, global allocation, bias+refit; KV 0.25),
# export, push to a local Hub (tests/hub_server.py: olah + the write-side test server), reload by repo id in a
# fresh process. Writes recipes/results/hub_smollm2_roundtrip.json and model_cards/examples/smollm2-135m-geocomp/.
# Run from the repository root: flock /tmp/geocomp-bench.lock bash recipes/hub_smollm2_roundtrip.sh
set -euo pipefail
work=runs/hub
mkdir -p "$work"
rm -rf "$work/server" "$work/hf-home"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python tests/hub_server.py "$work/server/mirrors" "$port" 2> "$work/server.log" &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 100); do python -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break; sleep 0.3; done
HF_HUB_OFFLINE=0 HF_ENDPOINT="http://127.0.0.1:$port" HF_HOME="$work/hf-home" \
  python -m hf_geocomp.studies.hub_roundtrip --push-repo-id geocomp/smollm2-135m-geocomp \
  --recipe recipes/hub_smollm2_roundtrip.sh "$@"
