#!/usr/bin/env bash
# Builds the image of the latest t2i-task Bento (`make bento`): deploy/container.sh cpu|gpu [TAG]
#   BASE_IMAGE    the base image (default: the Bento's python:3.11-slim)
#   TORCH_WHEELS  cpu: a folder holding torch 2.13.0's CPU wheel (default /opt/wheels);
#                 without one the build takes it from PyTorch's CPU index
#   XFORMERS      gpu: an xformers requirement to add, e.g. xformers==0.0.35 (default none)
# `docker build` runs in the Bento's own folder with the Dockerfile BentoML rendered there:
# `bentoml containerize` fails on the template (bentoml/BentoML#5566, docs/deployment.md).
set -euo pipefail

variant=${1:-cpu}
tag=${2:-t2i-task:$variant}
bento=$("${BENTOML:-.venv/bin/bentoml}" get t2i-task:latest -o path)
args=(--tag "$tag" --file env/docker/Dockerfile)
if [ -n "${BASE_IMAGE:-}" ]; then args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE"); fi

case $variant in
cpu)
    wheels=${TORCH_WHEELS:-/opt/wheels}
    if compgen -G "$wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
        # Served over HTTP to the build (host network), so the 190 MB wheel is never
        # copied into a layer of the image.
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        python3 -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >/dev/null 2>&1 &
        trap "kill $!" EXIT
        args+=(--network host --build-arg "UV_FIND_LINKS=http://127.0.0.1:$port/")
    else
        args+=(--build-arg "UV_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch/")
    fi ;;
gpu)
    if [ -n "${XFORMERS:-}" ]; then args+=(--build-arg "XFORMERS=$XFORMERS"); fi ;;
*)
    echo "usage: $0 cpu|gpu [TAG]" >&2
    exit 2 ;;
esac

start=$SECONDS
(cd "$bento" && docker build "${args[@]}" .)
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "built $tag ($variant) from $bento in $((SECONDS - start)) s; size $((size / 1000000)) MB"
