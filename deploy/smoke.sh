#!/usr/bin/env bash
# The container end to end: deploy/smoke.sh [IMAGE]
# Without IMAGE it first builds t2i-task:$VARIANT with `make container` (VARIANT, BASE_IMAGE
# as there). Then: runs it with a new named volume on /data, waits for /readyz, generates one
# image and checks it, checks the database landed in the volume, and checks that `docker stop`
# drains. Removes its container and volume; exits non-zero on any failure.
set -euo pipefail

variant=${VARIANT:-cpu}
image=${1:-}
name=t2i-smoke-$$
volume=t2i-smoke-$$
ready_timeout_s=${READY_TIMEOUT_S:-180}
python=python3
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi  # has PIL for the pixel check

now() { date +%s.%N; }
since() { "$python" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
fail() { echo "SMOKE FAILED: $*" >&2; docker logs --tail 40 "$name" >&2 || true; exit 1; }
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; docker volume rm "$volume" >/dev/null 2>&1 || true; }
trap cleanup EXIT

build_s=-
if [ -z "$image" ]; then
    image=t2i-task:$variant
    start=$(now)
    make container VARIANT="$variant" IMAGE="$image"
    build_s=$(since "$start")
fi
size_mb=$(( $(docker image inspect --format '{{.Size}}' "$image") / 1000000 ))

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
start=$(now)
docker run -d --name "$name" --stop-timeout 60 -p "127.0.0.1:$port:3000" -v "$volume:/data" "$image" >/dev/null
# --max-time: a probe that arrives while the worker is still starting can hang (docs/deployment.md).
until curl -fs --max-time 2 -o /dev/null "$url/readyz"; do
    [ "$(docker inspect --format '{{.State.Running}}' "$name")" = true ] || fail "the container exited"
    (( $(date +%s) - ${start%.*} < ready_timeout_s )) || fail "not ready after ${ready_timeout_s} s"
    sleep 0.5
done
ready_s=$(since "$start")

response=$(mktemp)
curl -fsS -X POST "$url/v1/images/generations" -H 'Content-Type: application/json' -o "$response" \
    -d '{"prompt": "a red circle on a blue background", "response_format": "b64_json", "seed": 42}' \
    || fail "the generation request failed"
# The default model (shapes-64) draws the shape the prompt names: blue must dominate and a red area show.
"$python" - "$response" <<'EOF' || fail "the image is not the expected picture"
import base64, io, json, struct, sys
png = base64.b64decode(json.load(open(sys.argv[1]))["data"][0]["b64_json"])
assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
size = struct.unpack(">II", png[16:24])
assert size == (64, 64), f"size {size}"
try:
    from PIL import Image
except ImportError:
    sys.exit(print("PNG 64x64 (no PIL here: pixels not checked)"))
pixels = Image.open(io.BytesIO(png)).convert("RGB").tobytes()
rgb = [pixels[i:i + 3] for i in range(0, len(pixels), 3)]
blue = sum(b > r + 40 and b > g + 40 for r, g, b in rgb) / len(rgb)
red = sum(r > g + 60 and r > b + 60 for r, g, b in rgb) / len(rgb)
print(f"PNG 64x64: {blue:.0%} blue, {red:.0%} red pixels")
assert blue > 0.5 and red > 0.05, "not mostly blue with a red area"
EOF
rm -f "$response"

docker exec "$name" test -s /data/t2i.db || fail "no database in the volume"
echo "volume: $(docker exec "$name" ls -ln /data | tail -n +2 | awk '{print $3":"$4, $NF}' | tr '\n' ' ')"

start=$(now)
docker stop "$name" >/dev/null
stop_s=$(since "$start")
docker logs "$name" 2>&1 | grep -q "draining:" || fail "no 'draining:' line in the logs after docker stop"
exit_code=$(docker inspect --format '{{.State.ExitCode}}' "$name")
[ "$exit_code" = 0 ] || fail "exit code $exit_code after docker stop"

echo "SMOKE PASSED: $image, ${size_mb} MB; build ${build_s} s; ready ${ready_s} s after docker run;" \
    "docker stop ${stop_s} s, drained, exit 0"
