# One image for the control plane and the data plane:
#   sidegate operator            (the kopf operator)
#   sidegate proxy --config F    (a gateway Deployment or an injected sidecar)
# Multi-stage: wheels are built with compilers in the first stage; the final stage has none.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# the data plane's per-statement modules are compiled with mypyc (setup.py): the image runs those
RUN pip install --no-cache-dir "setuptools>=77" wheel "mypy>=1.10"
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
COPY operator ./operator
COPY crds ./crds
RUN SIDEGATE_NATIVE=1 pip wheel --no-cache-dir --no-build-isolation --wheel-dir /wheels . \
    && python -c "import zipfile, glob; names = zipfile.ZipFile(glob.glob('/wheels/sidegate-*.whl')[0]).namelist(); \
assert any(n.startswith('sidegate_proxy/pgproxy.') and n.endswith('.so') for n in names), 'not compiled'"

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="sidegate" \
      org.opencontainers.image.description="Identity-aware L7 gateway for non-human identities" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl && rm -rf /wheels \
    && python -c "import sidegate_proxy as p; assert p.NATIVE.active, p.NATIVE.reason; assert p.LANE, 'no native lane'" \
    && useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin sidegate
USER 65532:65532
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 15432 18080 9090 8443
ENTRYPOINT ["sidegate"]
CMD ["--help"]
