# syntax=docker/dockerfile:1
# Sovereign gateway image: build wheels in one stage, run as non-root in a slim one.

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
# Build tools live only in this stage (hiredis/uvloop may need to compile on some platforms).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY setup.cfg pyproject.toml README.md ./
COPY proxy ./proxy
COPY middleware ./middleware
# With the optional extras an operator may switch on by configuration alone: agent mode's MCP
# client (tool_servers) and OpenTelemetry export (telemetry.otlp_endpoint).
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[agent,otel]'

FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SOVEREIGN_CONFIG=/etc/sovereign/sovereign.yaml \
    SOVEREIGN_HOST=0.0.0.0 \
    SOVEREIGN_PORT=8080
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sovereign
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/* && rm -rf /wheels
COPY config/sovereign.yaml /etc/sovereign/sovereign.yaml
USER 10001
EXPOSE 8080
# SIGTERM starts the graceful drain (server.drain_seconds); match the orchestrator's grace period.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["sovereign"]
CMD ["serve"]
