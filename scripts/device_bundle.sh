#!/usr/bin/env bash
# What scripts/device_check.sh needs on a bare GPU machine that reaches no package registry, built here into
# .device/ (git-ignored through .git/info/exclude; about 40 MiB, under the 64 MiB a device call may carry):
#   jre.tar.xz            Java 17 cut down with jlink to the modules TorchServe's frontend uses (if the GPU
#                         machine has no java)
#   model-server.jar.xz   TorchServe 0.12.0's frontend without the build-time parts it bundles (Groovy, TestNG,
#                         JUnit, Ant, JavaParser) and other platforms' native libraries
#   ts/                   TorchServe's Python side (its worker), without the jar
#   whl/                  the front door's packages for CPython 3.12 that the GPU image lacks or has older
#   runs/                 the demo's, images' and ResNet's trained runs, trimmed to what `gradserve package` reads
# Run from the repository root after `make install` (the .venv) and after the three runs exist:
#     scripts/device_bundle.sh
set -euo pipefail
ROOT=$(pwd)
B=$ROOT/.device
PY=$ROOT/.venv/bin/python
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
JDK=${JDK:-/usr/lib/jvm/java-17-openjdk-amd64}  # a JDK with jlink and its jmods

mkdir -p "$B" .git/info
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude
rm -rf "$B/jre" "$B/ts" "$B/whl" "$B/runs"

echo "JRE (jlink)"
"$JDK/bin/jlink" --add-modules java.base,java.desktop,java.instrument,java.logging,java.management,java.naming,java.net.http,java.scripting,java.sql,java.xml,jdk.crypto.ec,jdk.management,jdk.unsupported,jdk.zipfs \
    --strip-debug --no-header-files --no-man-pages --compress=0 --output "$B/jre"
tar cJf "$B/jre.tar.xz" -C "$B" jre && rm -rf "$B/jre"

echo "TorchServe's frontend, trimmed"
$PY - "$SITE/ts/frontend/model-server.jar" "$B/model-server.jar" <<'EOF'
import sys, zipfile
BUILD_ONLY = ("org/codehaus/groovy", "org/apache/groovy", "groovy/", "groovyjarjar", "org/testng", "org/junit",
              "junit/", "org/apache/tools", "com/github/javaparser", "picocli", "com/thoughtworks/qdox",
              "org/opentest4j", "org/apiguardian", "META-INF/groovy", "META-INF/services/javax.script")
with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_STORED) as out:
    for entry in src.infolist():
        name = entry.filename
        other_platform = (name.startswith("META-INF/native/") and not name.endswith("/")
                          and not (("linux" in name or "epoll" in name) and ("x86_64" in name or "linux64" in name)))
        if not (name.startswith(BUILD_ONLY) or other_platform):
            out.writestr(entry, src.read(name), compress_type=zipfile.ZIP_STORED)  # stored: xz packs it better
EOF
xz -9 -T0 -f "$B/model-server.jar"

echo "TorchServe's worker"
mkdir -p "$B/ts"
cp -r "$SITE/ts" "$SITE"/torchserve-0.12.0.dist-info "$B/ts/"
rm -f "$B/ts/ts/frontend/model-server.jar"
find "$B/ts" -name __pycache__ -prune -exec rm -rf {} +

echo "wheels for CPython 3.12"
PLATFORMS=""
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
pinned() { $PY -c "import importlib.metadata as m, sys; print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" "$@"; }
# shellcheck disable=SC2046,SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d "$B/whl" \
    $(pinned grpcio grpcio-health-checking grpcio-reflection protobuf fastapi starlette pydantic pydantic_core \
             pysimdjson uvicorn httptools torch-model-archiver swagger-ui-bundle-v2 annotated-types \
             typing-inspection typing-extensions annotated-doc opentelemetry-api)

echo "trained runs, trimmed"
$PY - "$B/runs" runs/digits examples/images/runs/digits-rgb examples/resnet/runs/resnet <<'EOF'
import json, shutil, sys
from pathlib import Path
into = Path(sys.argv[1])
for run in map(Path, sys.argv[2:]):
    chosen = json.loads((run / "selection.json").read_text())
    keep = ["selection.json", "summary.json", chosen["checkpoints"][chosen["selection"]["index"]]]
    for name in keep:
        (into / run / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / name, into / run / name)
    if (run / "code").is_dir():  # the model code the run was trained with (runs from before it kept one: none)
        shutil.copytree(run / "code", into / run / "code", dirs_exist_ok=True)
EOF
du -sh "$B"
