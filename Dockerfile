# syntax=docker/dockerfile:1
# Multi-stage build of the single `prereg` binary (subcommands: migrate,
# intake, worker, scheduler, admin). See docker-compose.yml for how it runs.

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# sqlx: never try to reach a database at compile time; query! macros (if any)
# must then find their metadata in a committed .sqlx/ directory.
ENV SQLX_OFFLINE=true
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin prereg \
 && cp target/release/prereg /usr/local/bin/prereg

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates for outgoing TLS; curl only for the compose healthchecks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin prereg
COPY --from=builder /usr/local/bin/prereg /usr/local/bin/prereg
# Migrations are shipped too, in case they are read at run time rather than
# embedded with sqlx::migrate!().
COPY --chown=root:root migrations /app/migrations
WORKDIR /app
USER prereg
# 8080: intake HTTP (+ /healthz, /metrics); 9091: worker health + metrics.
EXPOSE 8080 9091
ENTRYPOINT ["prereg"]
