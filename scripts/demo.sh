#!/usr/bin/env bash
# Newcomer demo: install what s3cryptfs needs, start a local SeaweedFS S3 server, create an
# encrypted volume in it and mount it at ./mnt. Run from the repository root, as root (FUSE and
# apt need it). Everything it creates lives in ./.demo (server data, password, cache).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/.demo
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v fusermount3 >/dev/null || [ ! -e /usr/include/fuse3/fuse.h ]; then
    echo "==> installing FUSE (apt)"
    apt-get update -qq
    apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv >/dev/null
fi

if [ ! -x .venv/bin/s3cryptfs ]; then
    echo "==> creating .venv and installing s3cryptfs (pyfuse3 compiles; takes a minute)"
    python3 -m venv .venv
    .venv/bin/pip install -q -e '.[test]'
fi
export PATH=$ROOT/.venv/bin:$PATH

mkdir -p "$DEMO" mnt
chmod 700 "$DEMO"
if [ -f "$DEMO/weed.pid" ] && kill -0 "$(cat "$DEMO/weed.pid")" 2>/dev/null; then
    echo "==> SeaweedFS already running (pid $(cat "$DEMO/weed.pid"))"
else
    echo "==> starting SeaweedFS on 127.0.0.1"
    python3 - "$DEMO" <<'PY'
import json, socket, subprocess, sys, os
demo = sys.argv[1]
def free_pair():
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
        if p + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
ports = {n: free_pair() for n in ("master", "volume", "filer", "s3", "admin")}
args = ["weed", "mini", f"-dir={demo}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false"]
for n, p in ports.items():
    args += [f"-{n}.port={p}", f"-{n}.port.grpc={p + 10000}"]
os.makedirs(f"{demo}/data", exist_ok=True)
env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
log = open(f"{demo}/weed.log", "ab")
proc = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
open(f"{demo}/weed.pid", "w").write(str(proc.pid))
open(f"{demo}/endpoint", "w").write(f"http://127.0.0.1:{ports['s3']}")
PY
fi
ENDPOINT=$(cat "$DEMO/endpoint")
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo-secret AWS_DEFAULT_REGION=us-east-1
python3 - "$ENDPOINT" <<'PY'
import sys, time, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
for _ in range(120):
    try:
        s3.create_bucket(Bucket="demo-bucket")
        break
    except s3.exceptions.BucketAlreadyOwnedByYou:
        break
    except Exception:
        time.sleep(0.5)
else:
    sys.exit("SeaweedFS did not start; see .demo/weed.log")
PY

if [ ! -f "$DEMO/password" ]; then
    (umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(24), end="")' > "$DEMO/password")
fi
if ! s3cryptfs init s3://demo-bucket/files --endpoint-url "$ENDPOINT" \
        --password-file "$DEMO/password" 2>"$DEMO/init.err"; then
    grep -q "already an s3cryptfs volume" "$DEMO/init.err" || { cat "$DEMO/init.err"; exit 1; }
fi
if grep -q " $ROOT/mnt " /proc/mounts; then
    echo "==> already mounted at ./mnt"
else
    s3cryptfs mount s3://demo-bucket/files mnt --endpoint-url "$ENDPOINT" \
        --password-file "$DEMO/password" --cache-dir "$DEMO/cache"
fi
cat <<TXT

Mounted: ./mnt is the encrypted volume s3://demo-bucket/files on $ENDPOINT.
Try:    echo hello > mnt/hello.txt && cat mnt/hello.txt
See the ciphertext (in S3 about a second after the close, --upload-delay):
        AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo-secret \\
        .venv/bin/python -c "import boto3; c = boto3.client('s3', endpoint_url='$ENDPOINT', region_name='us-east-1'); c.get_waiter('object_exists').wait(Bucket='demo-bucket', Key='files/hello.txt', WaiterConfig={'Delay': 1}); print(c.get_object(Bucket='demo-bucket', Key='files/hello.txt')['Body'].read())"
Unmount (waits until every file is in S3):  .venv/bin/s3cryptfs umount mnt
Stop the S3 server:  kill \$(cat .demo/weed.pid)
The volume password is in .demo/password.
TXT
