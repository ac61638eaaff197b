# gradserve: the gRPC/REST front door with TorchServe on loopback inside. deploy/README.md has the details.
#   build, archive mounted at run time:  podman build --format docker -t gradserve .
#   build, archive baked in:             podman build --format docker --build-arg MODEL_ARCHIVE=digits.mar \
#                                            -t gradserve .
#   run:  podman run --init -p 8001:8001 -p 8000:8000 [-v "$PWD/model_store:/app/model_store:ro"] gradserve
# (--format docker keeps the HEALTHCHECK; Docker/BuildKit keep it anyway.)
# A local wheel directory replaces the index for torch (e.g. the CPU-only build):
#   --build-context torch-wheels=DIR

ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG PYTHON_VERSION=3.11.2-6+deb12u9

# Extra wheels pip prefers to the index; empty unless --build-context torch-wheels=DIR replaces this stage.
FROM scratch AS torch-wheels

# The pinned dependency set in a virtual environment: its own stage, rebuilt only when the pins change.
FROM ${DEBIAN_IMAGE} AS deps
ARG PYTHON_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11="${PYTHON_VERSION}" python3.11-venv="${PYTHON_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv && pip install setuptools==84.2.1 wheel==0.48.0
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY --from=torch-wheels / /tmp/wheels/
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], \
        sep="\n")' > /tmp/requirements.txt \
    && pip install --find-links /tmp/wheels -c constraints.txt -r /tmp/requirements.txt

# The project as a wheel, with the gRPC stubs generated from proto/ here (they are never committed).
FROM deps AS build
COPY . .
RUN python proto/build.py && pip wheel --no-deps --no-build-isolation --wheel-dir /dist .
# The archive to bake in: MODEL_ARCHIVE names a .mar in model_store/ (digits.mar or model_store/digits.mar);
# without it the image holds none and one is mounted at /app/model_store.
ARG MODEL_ARCHIVE=""
RUN mkdir -p /app/model_store \
    && if [ -n "${MODEL_ARCHIVE}" ]; then cp "model_store/$(basename "${MODEL_ARCHIVE}")" /app/model_store/; fi

FROM ${DEBIAN_IMAGE} AS runtime
ARG PYTHON_VERSION
ARG JRE_VERSION=17.0.21.1+2-1~deb12u1
ARG TINI_VERSION=0.19.0-1+b3
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The JRE's postinst links man pages, which slim images leave out.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11="${PYTHON_VERSION}" \
        openjdk-17-jre-headless="${JRE_VERSION}" tini="${TINI_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/gradserve gradserve \
    && mkdir -p /app/logs && chown gradserve:gradserve /app/logs
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-deps --no-index /tmp/dist/*.whl && rm -r /tmp/dist
COPY --from=build /app/model_store /app/model_store
COPY gradserve.yaml /app/gradserve.yaml
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001:10001
# Only the front door is published; TorchServe listens on 127.0.0.1 inside.
EXPOSE 8001 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "client.healthcheck", "127.0.0.1:8001"]
# tini forwards SIGTERM to the front door (which drains, stops TorchServe and exits 0) and reaps orphans,
# with or without `--init`; as a subreaper it also works below podman's/docker's own init.
ENTRYPOINT ["tini", "-s", "--", "gradserve"]
CMD ["serve", "--config", "/app/gradserve.yaml", "--host", "0.0.0.0", "--grpc-port", "8001", \
     "--http-port", "8000", "--model-store", "/app/model_store"]
