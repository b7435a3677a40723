#!/usr/bin/env bash
# Launch training the way the machine needs it.
#   ./start_training.sh --config NAME --gpus N [--fsdp] [--max-steps K] [--resume X]
#                       [--mixed-precision bf16|fp16|no] [--backend torch|mlx] [--dry-run]
#                       [--num-machines M --machine-rank R --main-process-ip IP
#                        --main-process-port P] [any train.py flag]
# --gpus 0: CPU, one process.  1: one process.  N>=2 (or M>=2 machines): accelerate launch
# with configs/accelerate/ddp.yaml (multinode.yaml), or fsdp.yaml with --fsdp; with
# --backend mlx, N>=2 starts N mlx.launch ranks on this machine. --dry-run prints the
# command and exits. Arguments are passed on quoted, never re-split or eval'd.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; }
die() { echo "start_training.sh: $*" >&2; exit 2; }
need() { [ "$1" -ge 2 ] || die "$2 needs a value"; }
whole() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"; }

CONFIG=smoke GPUS=1 FSDP=0 BACKEND=torch DRY_RUN=0
NUM_MACHINES=1 MACHINE_RANK=0 MAIN_IP="" MAIN_PORT=29500
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) need $# "$1"; CONFIG=$2; PASS+=(--config "$2"); shift 2 ;;
    --gpus) need $# "$1"; GPUS=$2; shift 2 ;;
    --fsdp) FSDP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --backend) need $# "$1"; BACKEND=$2; shift 2 ;;
    --num-machines) need $# "$1"; NUM_MACHINES=$2; shift 2 ;;
    --machine-rank) need $# "$1"; MACHINE_RANK=$2; shift 2 ;;
    --main-process-ip) need $# "$1"; MAIN_IP=$2; shift 2 ;;
    --main-process-port) need $# "$1"; MAIN_PORT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --*) # Any train.py flag, with its value when it has one; train.py validates it.
      if [ $# -ge 2 ] && [[ "$2" != --* ]]; then PASS+=("$1" "$2"); shift 2; else PASS+=("$1"); shift; fi ;;
    *) usage; die "unexpected argument '$1'" ;;
  esac
done
whole --gpus "$GPUS"; whole --num-machines "$NUM_MACHINES"; whole --machine-rank "$MACHINE_RANK"
whole --main-process-port "$MAIN_PORT"
[ "$NUM_MACHINES" -ge 1 ] || die "--num-machines must be at least 1"
[ "$MACHINE_RANK" -lt "$NUM_MACHINES" ] \
  || die "--machine-rank $MACHINE_RANK must be below --num-machines $NUM_MACHINES (0 on the main machine)"
if [ "$NUM_MACHINES" -gt 1 ]; then
  [ "$GPUS" -ge 1 ] || die "--num-machines $NUM_MACHINES needs --gpus N (GPUs on each machine)"
  [ -n "$MAIN_IP" ] || die "--num-machines $NUM_MACHINES needs --main-process-ip (the address of machine rank 0)"
fi

if [ ! -x .venv/bin/python ]; then
  echo "[start] no .venv yet: running ./setup.sh"
  ./setup.sh
fi
PY=.venv/bin/python
ALL=("${PASS[@]}"); [ "$BACKEND" = torch ] || ALL+=(--backend "$BACKEND")
# Validate the flags before anything slow happens: the usage, then the problem in one line.
if ! err=$("$PY" -c 'import sys; from configs.cli import parse_args; parse_args(sys.argv[1:], prog="start_training.sh")' "${ALL[@]}" 2>&1 >/dev/null); then
  usage; echo "$err" >&2; exit 2
fi

if [ "$BACKEND" = mlx ] && [ "$NUM_MACHINES" -gt 1 ]; then
  die "--backend mlx runs on one machine (mlx.launch ranks there); drop --num-machines"
elif [ "$BACKEND" = mlx ] && [ "$GPUS" -ge 2 ]; then
  # mlx.launch reads --backend itself: mlx_train.py is the MLX loop without that flag.
  CMD=(.venv/bin/mlx.launch --backend ring -n "$GPUS" "$PY" mlx_train.py "${PASS[@]}")
elif [ "$GPUS" -le 1 ] && [ "$NUM_MACHINES" -eq 1 ]; then
  [ "$GPUS" = 0 ] && export CUDA_VISIBLE_DEVICES=""
  CMD=("$PY" train.py "${ALL[@]}")
else
  if [ "$FSDP" = 1 ]; then ACCEL_CONFIG=configs/accelerate/fsdp.yaml
  elif [ "$NUM_MACHINES" -gt 1 ]; then ACCEL_CONFIG=configs/accelerate/multinode.yaml
  else ACCEL_CONFIG=configs/accelerate/ddp.yaml
  fi
  CMD=(.venv/bin/accelerate launch --config_file "$ACCEL_CONFIG"
       --num_processes "$((GPUS * NUM_MACHINES))" --num_machines "$NUM_MACHINES"
       --machine_rank "$MACHINE_RANK" --main_process_port "$MAIN_PORT")
  [ -n "$MAIN_IP" ] && CMD+=(--main_process_ip "$MAIN_IP")
  CMD+=(train.py "${ALL[@]}")
fi
echo "[start] $(printf '%q ' "${CMD[@]}")"
[ "$DRY_RUN" = 1 ] && exit 0

# The smoke preset trains on the bundled sample: prepare it on first use.
DATA_DIR=$("$PY" -c 'import sys; from configs.cli import parse_args; c,_=parse_args(sys.argv[1:]); print(c.data_dir if not c.sync_data else "")' "${ALL[@]}")
if [ "$CONFIG" = smoke ] && [ -n "$DATA_DIR" ] && [ ! -f "$DATA_DIR/dataset.json" ]; then
  echo "[start] sample data missing: python -m data.prepare --out $DATA_DIR"
  "$PY" -m data.prepare --out "$DATA_DIR"
fi
exec "${CMD[@]}"
