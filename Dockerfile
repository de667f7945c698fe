# syntax=docker/dockerfile:1
# ai-policy-gateway: `gateway serve` as a non-root user. Build from the repository root:
#
#   docker build -t ai-policy-gateway .
#
# The build context holds only what the package is built from (see .dockerignore). Two stages:
# the first installs the package and its dependencies into a virtual environment (every
# dependency ships manylinux wheels for x86_64 and aarch64, so no compiler is needed); the
# second copies that environment onto a clean slim image, without pip's caches or the sources.
# deploy/README.md describes the image, the Compose stack and the Kubernetes manifests.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/gateway
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
# pip compiles the bytecode here: the root filesystem may be read-only at run time.
RUN /opt/gateway/bin/pip install . \
    && /opt/gateway/bin/gateway check builtin

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ai-policy-gateway" \
      org.opencontainers.image.description="Policy-enforcement gateway for AI conversation APIs" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric id, so that Kubernetes can check runAsNonRoot (deploy/k8s uses 10001 too).
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway
# Owned by root and read-only for the gateway user: the code cannot be changed by the process.
COPY --from=build /opt/gateway /opt/gateway
# Listen on every interface (the gateway's own default is 127.0.0.1). These variables win over
# the config file (GATEWAY_CONFIG): set host and admin_host with variables or flags, not there.
# On every interface the admin port needs its bearer token: GATEWAY_ADMIN_TOKEN or
# --admin-token-file (the gateway logs admin.unprotected at start when it has none).
ENV PATH="/opt/gateway/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_ADMIN_HOST=0.0.0.0
USER 10001:10001
# 8080: the proxy. 9090: the admin port (/healthz, /readyz, /metrics, /usage/{ws}, POST /-/reload;
# the last two behind the admin token); keep it off the public network.
EXPOSE 8080 9090
# The image has no curl: Python's standard library asks the admin port (GATEWAY_ADMIN_PORT if
# set in the environment); any answer but 2xx, or none within 3 s, is a failure. It sends no
# token: keep healthz in admin_open (the default).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_ADMIN_PORT', '9090'), timeout=3)"]
# Arguments of `docker run IMAGE ...` are flags of `gateway serve`, e.g. --workers 2.
ENTRYPOINT ["gateway", "serve"]
