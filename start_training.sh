#!/usr/bin/env bash
# Launch training the way the machine needs it.
#   ./start_training.sh --config NAME --gpus N [--fsdp] [--max-steps K] [--resume X]
#                       [--mixed-precision bf16|fp16|no] [--backend torch|mlx] [--dry-run]
#                       [--num-machines M --machine-rank R --main-process-ip IP
#                        --main-process-port P] [--slurm] [--max-restarts N] [any train.py flag]
# Every flag also takes the --flag=value form.
# --gpus 0: CPU, one process.  1: one process.  N>=2 (or M>=2 machines): accelerate launch
# with configs/accelerate/ddp.yaml (multinode.yaml), or fsdp.yaml with --fsdp; with
# --backend mlx, N>=2 starts N mlx.launch ranks on this machine. --dry-run prints the
# command and exits. Arguments are passed on quoted, never re-split or eval'd.
# --slurm (inside an allocation, one task per node: configs/slurm/train.sbatch): machine
# rank, machine count and main address come from Slurm, --gpus from SLURM_GPUS_ON_NODE.
# --max-restarts N (0-100, default 0): after a crash, start again with --resume latest, up
# to N times (one line on stderr each); never after exit 0, a configuration error (2), a
# stop by Ctrl-C or SIGTERM (130, 143), or once this script got SIGTERM/SIGINT (it passes
# the signal on to training and exits with training's status).
set -euo pipefail
cd "$(dirname "$0")"

usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0" >&2; }
die() { echo "start_training.sh: $*" >&2; exit 2; }
need() { [ "$1" -ge 2 ] || die "$2 needs a value"; }
whole() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"; }

GPUS="" FSDP=0 BACKEND=torch DRY_RUN=0 SLURM=0 MAX_RESTARTS=0
NUM_MACHINES="" MACHINE_RANK="" MAIN_IP="" MAIN_PORT=""
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    # --flag=value (as GNU tools take it): this script's own value flags are split in two.
    --gpus=*|--backend=*|--num-machines=*|--machine-rank=*|--main-process-ip=*\
    |--main-process-port=*|--max-restarts=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --gpus) need $# "$1"; GPUS=$2; shift 2 ;;
    --fsdp) FSDP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --slurm) SLURM=1; shift ;;
    --backend) need $# "$1"; BACKEND=$2; shift 2 ;;
    --num-machines) need $# "$1"; NUM_MACHINES=$2; shift 2 ;;
    --machine-rank) need $# "$1"; MACHINE_RANK=$2; shift 2 ;;
    --main-process-ip) need $# "$1"; MAIN_IP=$2; shift 2 ;;
    --main-process-port) need $# "$1"; MAIN_PORT=$2; shift 2 ;;
    --max-restarts) need $# "$1"; MAX_RESTARTS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --*=*) PASS+=("$1"); shift ;;  # a train.py flag with its value attached
    --*) # Any train.py flag, with its value when it has one; train.py validates it.
      if [ $# -ge 2 ] && [[ "$2" != --* ]]; then PASS+=("$1" "$2"); shift 2; else PASS+=("$1"); shift; fi ;;
    *) usage; die "unexpected argument '$1'" ;;
  esac
done
if [ "$SLURM" = 1 ]; then
  # One launcher per node (srun --ntasks-per-node=1); Slurm says which node this is.
  [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_NODEID:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] \
    || die "--slurm needs a Slurm allocation (no SLURM_JOB_ID/SLURM_NODEID/SLURM_JOB_NODELIST here): submit configs/slurm/train.sbatch with sbatch"
  [ -z "$NUM_MACHINES$MACHINE_RANK" ] \
    || die "--slurm takes --num-machines and --machine-rank from Slurm (SLURM_NNODES, SLURM_NODEID): drop them"
  [ "${SLURM_LOCALID:-0}" = 0 ] \
    || die "--slurm starts one launcher per node, but this is task ${SLURM_LOCALID} of its node: use srun --ntasks-per-node=1"
  NUM_MACHINES=${SLURM_STEP_NUM_NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}}
  MACHINE_RANK=$SLURM_NODEID
  whole SLURM_NNODES "$NUM_MACHINES"; whole SLURM_NODEID "$MACHINE_RANK"
  if [ "$NUM_MACHINES" -gt 1 ] && [ -z "${SLURM_STEP_ID:-}" ]; then
    die "--slurm on $NUM_MACHINES nodes must run under srun (one task per node), not in the batch script itself"
  fi
  if [ -z "$MAIN_IP" ]; then
    command -v scontrol >/dev/null 2>&1 || die "--slurm needs scontrol (Slurm's client) to find the main node"
    HOSTS=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}") \
      || die "scontrol show hostnames '${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}' failed"
    MAIN_IP=${HOSTS%%$'\n'*}
  fi
  # Jobs that share a node need their own port: 29500 + the job id modulo 1000.
  whole SLURM_JOB_ID "$SLURM_JOB_ID"
  [ -n "$MAIN_PORT" ] || MAIN_PORT=$((29500 + SLURM_JOB_ID % 1000))
  # GPUs of this node: what Slurm allocated (--gpus-per-node), unless --gpus says otherwise;
  # on a cluster without GPU GRES, the GPUs nvidia-smi sees (none: the CPU).
  if [ -z "$GPUS" ]; then
    GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)}
    whole SLURM_GPUS_ON_NODE "$GPUS"
    [ "$NUM_MACHINES" -eq 1 ] || [ "$GPUS" -ge 1 ] \
      || die "--slurm on $NUM_MACHINES nodes needs GPUs on each: sbatch --gpus-per-node=G (or --gpus G)"
  fi
fi
GPUS=${GPUS:-1} NUM_MACHINES=${NUM_MACHINES:-1} MACHINE_RANK=${MACHINE_RANK:-0} MAIN_PORT=${MAIN_PORT:-29500}
whole --gpus "$GPUS"; whole --num-machines "$NUM_MACHINES"; whole --machine-rank "$MACHINE_RANK"
whole --main-process-port "$MAIN_PORT"
[[ "$MAX_RESTARTS" =~ ^0*([0-9]{1,3})$ ]] && [ "$((10#${BASH_REMATCH[1]}))" -le 100 ] \
  || die "--max-restarts must be a whole number from 0 to 100, got '$MAX_RESTARTS'"
MAX_RESTARTS=$((10#${BASH_REMATCH[1]}))
[ "$NUM_MACHINES" -ge 1 ] || die "--num-machines must be at least 1"
[ "$MACHINE_RANK" -lt "$NUM_MACHINES" ] \
  || die "--machine-rank $MACHINE_RANK must be below --num-machines $NUM_MACHINES (0 on the main machine)"
if [ "$NUM_MACHINES" -gt 1 ]; then
  [ "$GPUS" -ge 1 ] || die "--num-machines $NUM_MACHINES needs --gpus N (GPUs on each machine)"
  [ -n "$MAIN_IP" ] || die "--num-machines $NUM_MACHINES needs --main-process-ip (the address of machine rank 0)"
fi

if [ ! -x .venv/bin/python ]; then
  # Every node would run it at once on a shared file system.
  [ "$SLURM" = 0 ] || die "--slurm: no .venv in $PWD: run ./setup.sh once before submitting"
  echo "[start] no .venv yet: running ./setup.sh"
  ./setup.sh
fi
PY=.venv/bin/python
ALL=("${PASS[@]}"); [ "$BACKEND" = torch ] || ALL+=(--backend "$BACKEND")
# Validate the flags before anything slow happens: the usage, then the problem in one line.
if ! err=$("$PY" -c 'import sys; from configs.cli import parse_args; parse_args(sys.argv[1:], prog="start_training.sh")' "${ALL[@]}" 2>&1 >/dev/null); then
  usage; echo "$err" >&2; exit 2
fi

TRAIN_ARGS=("${ALL[@]}")  # what the command ends with: train.py's (mlx_train.py's) flags
if [ "$BACKEND" = mlx ] && [ "$NUM_MACHINES" -gt 1 ]; then
  die "--backend mlx runs on one machine (mlx.launch ranks there); drop --num-machines"
elif [ "$BACKEND" = mlx ] && [ "$GPUS" -ge 2 ]; then
  # mlx.launch reads --backend itself: mlx_train.py is the MLX loop without that flag.
  CMD=(.venv/bin/mlx.launch --backend ring -n "$GPUS" "$PY" mlx_train.py "${PASS[@]}")
  TRAIN_ARGS=("${PASS[@]}")
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
  if [ "$SLURM" = 1 ]; then
    # Every line of a rank's output starts with "[rankN]: " (global rank) in the job's log;
    # a copy per rank goes to the run's output directory, slurm-JOB_ID/.
    RUN_DIR=$("$PY" -c 'import sys; from configs.cli import parse_args; print(parse_args(sys.argv[1:])[0].effective_output_dir)' "${ALL[@]}")
    CMD+=(--tee 3 --log_dir "$RUN_DIR/slurm-$SLURM_JOB_ID")
    export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=${TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE:-'[rank${rank}]: '}
  fi
  CMD+=(train.py "${ALL[@]}")
fi
if [ "$SLURM" = 1 ]; then
  export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}  # the job's log is a file: show lines as they come
  PROCS=$(( GPUS > 1 ? GPUS : 1 ))
  echo "[start] slurm job $SLURM_JOB_ID on $(hostname -s 2>/dev/null || hostname): machine rank $MACHINE_RANK of $NUM_MACHINES," \
       "ranks $((MACHINE_RANK * PROCS))-$((MACHINE_RANK * PROCS + PROCS - 1)) of $((NUM_MACHINES * PROCS)) here, main process $MAIN_IP:$MAIN_PORT"
fi
echo "[start] $(printf '%q ' "${CMD[@]}")"
if [ "$MAX_RESTARTS" -gt 0 ]; then
  # A restart resumes from the newest complete checkpoint: the user's --resume (if any) is
  # replaced by --resume latest (which starts from scratch when there is none yet).
  RESTART_ARGS=() SKIP=0
  for arg in "${TRAIN_ARGS[@]}"; do
    if [ "$SKIP" = 1 ]; then SKIP=0
    elif [ "$arg" = --resume ]; then SKIP=1
    elif [[ "$arg" != --resume=* ]]; then RESTART_ARGS+=("$arg")
    fi
  done
  RESTART_CMD=("${CMD[@]:0:${#CMD[@]}-${#TRAIN_ARGS[@]}}" "${RESTART_ARGS[@]}" --resume latest)
  echo "[start] after a crash: up to $MAX_RESTARTS restart(s) with --resume latest (--max-restarts $MAX_RESTARTS)"
fi
[ "$DRY_RUN" = 1 ] && exit 0

# Pretraining on the bundled sample's folder (the smoke preset's): prepare it on first use.
# Only that folder: a missing --data-dir elsewhere (data/examples/, the user's own) is
# train.py's error to report, never a place to write a sample into.
SAMPLE_DIR=$("$PY" -c 'import sys; from configs.cli import parse_args; from configs.training_config import PRESETS; c,_=parse_args(sys.argv[1:]); s=PRESETS["smoke"].data_dir; print(s if c.data_dir == s and c.stage == "pretrain" and not (c.sync_data or c.stream or c.topics or c.data_mix) else "")' "${ALL[@]}")
if [ -n "$SAMPLE_DIR" ] && [ ! -f "$SAMPLE_DIR/dataset.json" ]; then
  echo "[start] sample data missing: python -m data.prepare --out $SAMPLE_DIR"
  "$PY" -m data.prepare --out "$SAMPLE_DIR"
fi
[ "$MAX_RESTARTS" -gt 0 ] || exec "${CMD[@]}"

# --max-restarts: this shell stays as a supervisor. (torchrun's own --max-restarts would
# restart the ranks with the same arguments, i.e. from step 0 rather than the newest
# checkpoint, and only for accelerate launches; this loop adds --resume latest and covers
# every launch: one process, accelerate, mlx.launch.)
STOP="" CHILD=""
pass_on() {  # a signal for this script is for training: pass it on, and never restart
  STOP=$1
  [ -z "$CHILD" ] || kill -s "$1" "$CHILD" 2>/dev/null || true
}
trap 'pass_on TERM' TERM
trap 'pass_on INT' INT
RUN=("${CMD[@]}") RESTARTS=0 STATUS=""
while :; do
  if [ -n "$STOP" ]; then  # a signal came between two attempts: no new one
    exit "${STATUS:-$((128 + $(kill -l "$STOP")))}"
  fi
  # A script's background command ignores SIGINT; training gets Ctrl-C's default back.
  ( trap - INT QUIT; exec "${RUN[@]}" ) &
  CHILD=$!
  # A signal between the fork and the line above found no CHILD to pass on to (a loaded
  # machine can run training's start-up before this shell runs again): pass it on now.
  [ -z "$STOP" ] || kill -s "$STOP" "$CHILD" 2>/dev/null || true
  while :; do  # a trapped signal interrupts wait: wait again for training's own status
    STATUS=0; SIGNALLED=$STOP
    wait "$CHILD" || STATUS=$?
    [ "$STOP" != "$SIGNALLED" ] || kill -0 "$CHILD" 2>/dev/null || break
  done
  CHILD=""
  case "$STATUS" in
    0) exit 0 ;;
    2) exit 2 ;;  # a configuration error (train.py's one line says which): a restart repeats it
    130|143) exit "$STATUS" ;;  # stopped by Ctrl-C or SIGTERM
  esac
  [ -z "$STOP" ] || exit "$STATUS"
  if [ "$STATUS" -gt 128 ]; then
    CAUSE="killed by SIG$(kill -l "$((STATUS - 128))" 2>/dev/null || echo "$((STATUS - 128))"), status $STATUS"
  else
    CAUSE="exit status $STATUS"
  fi
  if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
    echo "start_training.sh: training failed ($CAUSE) after $RESTARTS restart(s): giving up (--max-restarts $MAX_RESTARTS)" >&2
    exit "$STATUS"
  fi
  RESTARTS=$((RESTARTS + 1))
  echo "start_training.sh: training failed ($CAUSE): restart $RESTARTS of $MAX_RESTARTS with --resume latest" >&2
  RUN=("${RESTART_CMD[@]}")
done
