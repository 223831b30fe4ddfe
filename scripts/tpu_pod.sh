#!/usr/bin/env bash
# Runs an arjax experiment on every host of a Cloud TPU VM pod slice (one process per host;
# jax.distributed auto-detects the others). The work dir must be shared (gs://...).
#
#   scripts/tpu_pod.sh install  TPU ZONE
#   scripts/tpu_pod.sh start    TPU ZONE experiments.flowar_imagenet --config imagenet256_L \
#                               --workdir gs://BUCKET/runs/flowar_l --set data.data_dir=/mnt/tfds
#   scripts/tpu_pod.sh stop     TPU ZONE      # SIGTERM on every host: all save one step, exit
#   scripts/tpu_pod.sh log      TPU ZONE      # process 0's log
set -euo pipefail
action=$1 tpu=$2 zone=$3
shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command "$1"; }
case "$action" in
  install)
    gcloud compute tpus tpu-vm scp --recurse "$(dirname "$0")/.." "$tpu":arjax --zone="$zone" --worker=all
    ssh_all "python3 -m venv ~/venv && ~/venv/bin/pip install -q -e ~/arjax 'jax[tpu]==0.10.2'" ;;
  start)
    ssh_all "cd ~/arjax && nohup ~/venv/bin/python -m $* > ~/arjax.log 2>&1 & echo \$! > ~/arjax.pid" ;;
  stop)
    ssh_all 'kill -TERM $(cat ~/arjax.pid)' ;;
  log)
    gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=0 --command 'tail -n 50 ~/arjax.log' ;;
  *) echo "usage: $0 install|start|stop|log TPU ZONE [experiment args]" >&2; exit 2 ;;
esac
