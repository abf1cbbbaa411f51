# syntax=docker/dockerfile:1
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rotator ./rotator
RUN python -m venv /opt/psk-rotator \
 && /opt/psk-rotator/bin/pip install --no-cache-dir --upgrade pip==24.3.1 \
 && /opt/psk-rotator/bin/pip install --no-cache-dir .

FROM python:3.11.11-slim-bookworm
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
