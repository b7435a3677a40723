#!/usr/bin/env bash
# Launch training the way the machine needs it.
#   ./start_training.sh --config NAME --gpus N [--max-steps K] [--resume X]
#                       [--no-background-upload] [--mixed-precision bf16|fp16|no]
#                       [--backend torch|mlx] [--fsdp] [--num-machines M --machine-rank R
#                       --main-process-ip IP --main-process-port P] [any train.py flag]
# --gpus 0: CPU, one process.  1: one process.  N>=2: accelerate launch --multi_gpu (DDP,
# or FSDP with --fsdp). Arguments are passed on quoted, never re-split or eval'd.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; }
die() { echo "start_training.sh: $*" >&2; exit 2; }

CONFIG=smoke GPUS=1 FSDP=0 BACKEND=torch
NUM_MACHINES=1 MACHINE_RANK=0 MAIN_IP="" MAIN_PORT=29500
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || die "--config needs a value"; CONFIG=$2; PASS+=(--config "$2"); shift 2 ;;
    --gpus) [ $# -ge 2 ] || die "--gpus needs a value"; GPUS=$2; shift 2 ;;
    --fsdp) FSDP=1; shift ;;
    --backend) [ $# -ge 2 ] || die "--backend needs a value"; BACKEND=$2; PASS+=(--backend "$2"); shift 2 ;;
    --num-machines) NUM_MACHINES=$2; shift 2 ;;
    --machine-rank) MACHINE_RANK=$2; shift 2 ;;
    --main-process-ip) MAIN_IP=$2; shift 2 ;;
    --main-process-port) MAIN_PORT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --*) # Any train.py flag, with its value when it has one; train.py validates it.
      if [ $# -ge 2 ] && [[ "$2" != --* ]]; then PASS+=("$1" "$2"); shift 2; else PASS+=("$1"); shift; fi ;;
    *) usage; die "unexpected argument '$1'" ;;
  esac
done
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus must be a whole number, got '$GPUS'"

if [ ! -x .venv/bin/python ]; then
  echo "[start] no .venv yet: running ./setup.sh"
  ./setup.sh
fi
PY=.venv/bin/python
# Validate the flags before anything slow happens (exit 2 with one line).
"$PY" -c 'import sys; from configs.cli import parse_args; parse_args(sys.argv[1:])' "${PASS[@]}" || exit $?

# The smoke preset trains on the bundled sample: prepare it on first use.
DATA_DIR=$("$PY" -c 'import sys; from configs.cli import parse_args; c,_=parse_args(sys.argv[1:]); print(c.data_dir if not c.sync_data else "")' "${PASS[@]}")
if [ "$CONFIG" = smoke ] && [ -n "$DATA_DIR" ] && [ ! -f "$DATA_DIR/dataset.json" ]; then
  echo "[start] sample data missing: python -m data.prepare --out $DATA_DIR"
  "$PY" -m data.prepare --out "$DATA_DIR"
fi

if [ "$BACKEND" = mlx ] || { [ "$GPUS" -le 1 ] && [ "$NUM_MACHINES" -eq 1 ]; }; then
  [ "$GPUS" = 0 ] && export CUDA_VISIBLE_DEVICES=""
  echo "[start] $PY train.py ${PASS[*]}"
  exec "$PY" train.py "${PASS[@]}"
fi

LAUNCH=(--num_processes "$((GPUS * NUM_MACHINES))" --num_machines "$NUM_MACHINES"
        --machine_rank "$MACHINE_RANK" --main_process_port "$MAIN_PORT")
[ -n "$MAIN_IP" ] && LAUNCH+=(--main_process_ip "$MAIN_IP")
if [ "$FSDP" = 1 ]; then
  LAUNCH=(--config_file configs/accelerate/fsdp.yaml "${LAUNCH[@]}")
else
  LAUNCH=(--multi_gpu "${LAUNCH[@]}")
fi
echo "[start] accelerate launch ${LAUNCH[*]} train.py ${PASS[*]}"
exec .venv/bin/accelerate launch "${LAUNCH[@]}" train.py "${PASS[@]}"
