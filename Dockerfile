# syntax=docker/dockerfile:1
# proxyd container image: a builder stage compiles the wheels (proxyd with its
# Cython connection table, and python-iptables' C wrapper), the runtime stage
# installs them on python:3.11-slim with the netfilter tools and nothing to
# compile with. scripts/docker-steps.sh runs the same steps outside Docker (CI).
#
#   docker build -t proxyd:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY native/ native/
COPY proxyd/ proxyd/
# A silent fall-back to the pure-Python twin would hide a broken build:
# the extension must compile here. The constraints pin the build
# requirements (Cython, setuptools) as well as the dependencies.
ENV PROXYD_REQUIRE_EXTENSIONS=1 PIP_CONSTRAINT=/src/constraints.txt
RUN pip wheel --wheel-dir /wheels . \
    && ls /wheels/proxyd-*.whl

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# iptables ships both back ends (iptables-legacy, iptables-nft); ipset,
# conntrack and nftables for the kernel modes (libnftables1: nftables mode
# loads it in process); kmod for modprobe (ipvs);
# iproute2 for address and route handling.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables libnftables1 ipset conntrack kmod iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /wheels /wheels
RUN pip install --no-index --find-links /wheels /wheels/proxyd-*.whl \
    && rm -rf /wheels \
    && python -c "import proxyd.modes.userspace.conntable as c; assert c.NATIVE, 'native conntable missing'" \
    && proxyd --version
ENTRYPOINT ["proxyd"]
