#!/usr/bin/env bash
# Set up one node of an lgm_ray Ray cluster: the ONE copy of the set-up commands. cluster.yaml's set-up
# commands call it on every node (a cluster file for machines a lab already has calls it the same way);
# it installs the checkout it lies in.
#
#   scripts/cluster_setup.sh node [--efs FS_ID] [--shared DIR] [--no-weights] [--dry-run]   # every node
#   scripts/cluster_setup.sh head [--shared DIR] [--mlflow-port PORT] [--dry-run]           # the head, after node
#
# node: checks the cluster's Ray token (~/.ray/auth_token, which cluster.yaml's file_mounts copy from your
#       machine; made there once by `ray get-auth-token --generate`), makes every login shell of the node
#       talk to the cluster with it (RAY_AUTH_MODE=token in ~/.bashrc: `ray exec … "ray status"`,
#       `python -m lgm_ray.sweep … --address auto`), mounts the shared folder DIR (default /mnt/lgm_ray; EFS
#       with --efs, else DIR must already be shared by every node, e.g. a lab's NFS), installs pinned torch,
#       lgm_ray from this checkout, ray[default,tune] and s3fs/boto3, and fills the backbone weight caches
#       (--no-weights: skip), so that no trial waits on a download.
# head: the MLflow store on DIR and an MLflow server bound to 127.0.0.1:PORT (default 5000) only, never to
#       another address (reach it through an SSH tunnel: `ray attach cluster.yaml -p 5000`); does nothing
#       when one already answers there. Its log and pid (the pid is its process group) are ~/mlflow.{log,pid}.
# --dry-run: check the arguments (and the token), print each step instead of running it.
# Bad arguments or a missing token: one `error: …` line and exit 2, before anything is changed.
#
# Environment: PYTHON (default: python), the interpreter Ray runs with on the node.
set -euo pipefail

# Pins, as in the Makefile (torch) and pyproject.toml (ray): the driver and every node run the same versions.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
RAY_SPEC="ray[default,tune]==2.60.0"
BACKBONES=(clip_vitb16 clip_vitb32 dinov2_vitb14 eva02_vitb14 mocov3_vitb16)   # the paper's (sweeps/*.yaml)

PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USAGE="usage: scripts/cluster_setup.sh node [--efs FS_ID] [--shared DIR] [--no-weights] [--dry-run]"
USAGE+=" | head [--shared DIR] [--mlflow-port PORT] [--dry-run]"
TOKEN_FILE="$HOME/.ray/auth_token"
DRY=0

fail() {  # bad input: one line naming the problem and the fix, exit 2
    echo "error: $*" >&2
    exit 2
}

run() {  # one step: run it, or (--dry-run) print it
    if [ "$DRY" = 1 ]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}

add_line() {  # $1: file, $2: a line it must hold
    grep -qxF "$2" "$1" 2>/dev/null || echo "$2" >> "$1"
}

setup_node() {  # $1: shared folder, $2: EFS id or empty, $3: 1 to fill the weight caches
    [ -s "$TOKEN_FILE" ] || fail "no Ray token at $TOKEN_FILE: make one once on your machine with" \
        "\`ray get-auth-token --generate\` (cluster.yaml's file_mounts copy ~/.ray/auth_token to every node)"
    run chmod 600 "$TOKEN_FILE"
    run add_line "$HOME/.bashrc" "export RAY_AUTH_MODE=token"
    run sudo mkdir -p "$1"
    if [ -n "$2" ] && ! mountpoint -q "$1"; then
        run sudo mount -t efs -o tls "$2:/" "$1"   # amazon-efs-utils is in Ray's default AWS image
    fi
    run sudo chmod 777 "$1"
    run "$PYTHON" -m pip install -q --upgrade pip
    run "$PYTHON" -m pip install -q "${TORCH_PINS[@]}"
    run "$PYTHON" -m pip install -q -e "$REPO" s3fs boto3 "$RAY_SPEC"
    if [ "$3" = 1 ]; then  # timm / Hugging Face, open_clip and torch.hub caches of this node
        run "$PYTHON" -c "import sys; from lgm_ray.backbones.registry import create_backbone as c; [c(n) for n in sys.argv[1:]]" \
             "${BACKBONES[@]}"
    fi
}

mlflow_answers() {  # $1: port
    "$PYTHON" - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
}

setup_head() {  # $1: shared folder, $2: port
    local server=("$PYTHON" -m mlflow server --host 127.0.0.1 --port "$2"
        --backend-store-uri "sqlite:///$1/mlflow/mlflow.db" --artifacts-destination "$1/mlflow/artifacts")
    run mkdir -p "$1/mlflow/artifacts" "$1/sweeps"
    if [ "$DRY" = 1 ]; then
        printf '+ %s\n' "${server[*]}"
        return
    fi
    if mlflow_answers "$2"; then
        echo "MLflow already answers on http://127.0.0.1:$2"
        return
    fi
    setsid nohup "${server[@]}" > "$HOME/mlflow.log" 2>&1 < /dev/null &
    echo $! > "$HOME/mlflow.pid"
    for _ in $(seq 120); do
        if mlflow_answers "$2"; then
            echo "MLflow on http://127.0.0.1:$2 (log: ~/mlflow.log)"
            return
        fi
        sleep 2
    done
    tail -n 30 "$HOME/mlflow.log" >&2
    echo "error: MLflow did not answer on http://127.0.0.1:$2 within 240 s (its log above: ~/mlflow.log)" >&2
    exit 1
}

main() {
    local role=${1:-} shared=/mnt/lgm_ray efs="" weights=1 port=""
    case "$role" in
        node | head) shift ;;
        *) fail "the first argument is the node's role, node or head, not '$role' ($USAGE)" ;;
    esac
    while [ $# -gt 0 ]; do
        case "$1" in
            --efs) [ $# -ge 2 ] || fail "--efs needs a file system id ($USAGE)"; efs=$2; shift 2 ;;
            --shared) [ $# -ge 2 ] || fail "--shared needs a folder ($USAGE)"; shared=$2; shift 2 ;;
            --mlflow-port) [[ ${2:-} =~ ^[0-9]+$ ]] || fail "--mlflow-port needs a port number ($USAGE)"
                port=$2; shift 2 ;;
            --no-weights) weights=0; shift ;;
            --dry-run) DRY=1; shift ;;
            *) fail "unknown option '$1' ($USAGE)" ;;
        esac
    done
    if [ "$role" = head ]; then
        [ -z "$efs" ] && [ "$weights" = 1 ] || fail "--efs and --no-weights belong to 'node' ($USAGE)"
        setup_head "$shared" "${port:-5000}"
    else
        [ -z "$port" ] || fail "--mlflow-port belongs to 'head' ($USAGE)"
        setup_node "$shared" "$efs" "$weights"
    fi
}

main "$@"
