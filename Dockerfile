# syntax=docker/dockerfile:1
# The base: Docker Hub's Python 3.11 on Debian bookworm. tools/build-image.sh builds the same file
# without a Docker engine (buildah) and, where Docker Hub is out of reach, from a Debian bookworm
# root made with debootstrap (PYTHON_IMAGE=localhost/psk-rotator-base:bookworm).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY rotator ./rotator
# The runtime dependencies exactly as locked, each checked against its hash (tools/lock.sh makes the
# lock from pyproject.toml), then the project itself without resolving anything again.
RUN python -m venv /opt/psk-rotator \
 && /opt/psk-rotator/bin/pip install --no-cache-dir --upgrade pip==24.3.1 \
 && /opt/psk-rotator/bin/pip install --no-cache-dir --require-hashes -r requirements.lock \
 && /opt/psk-rotator/bin/pip install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 psk-rotator \
 && useradd --system --uid 10001 --gid psk-rotator --no-create-home --shell /usr/sbin/nologin psk-rotator
COPY --from=build /opt/psk-rotator /opt/psk-rotator
ENV PATH=/opt/psk-rotator/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ROTATOR_CONFIG=/etc/psk-rotator/rotator.toml
USER 10001
EXPOSE 9477
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9477/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["rotator"]
CMD ["run"]
