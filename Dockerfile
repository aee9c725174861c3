# ladle: model-soup merging service.
#
#   docker build -t ladle .
#   docker run --rm -p 127.0.0.1:8080:8080 -v ladle-data:/data \
#     -e LADLE_API_TOKEN_SHA256="$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)" ladle
#
# The image listens on 0.0.0.0:8080 (LADLE_BIND), which ladle refuses to do without API
# token digests (LADLE_API_TOKEN_SHA256 / LADLE_API_TOKENS_FILE) or an explicit
# LADLE_INSECURE_NO_AUTH=true. See deploy/README.md for Compose and Kubernetes.

############################ builder ############################
FROM rust:1.95-bookworm AS builder
WORKDIR /build

# Dependency layer: build every dependency against stub sources, so that later source-only
# changes reuse this layer. Only the manifests are copied here, plus every file Cargo.toml
# names as a target (the `[[bench]]` entries: cargo refuses a manifest whose targets are
# missing, whatever it is asked to build). Afterwards the stub crate's own artifacts are
# deleted (the dependencies' are kept), so the real crate is rebuilt even if its files carry
# older timestamps than the stub's.
#
# `.ci/run` replays this stage without Docker (deploy/replay-docker-build.sh): an empty
# folder with only the paths copied here, then the same cargo commands. A new target in
# Cargo.toml, or a file the crate embeds at compile time outside src/ and migrations/, must be
# copied below or that check fails.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/ladle-* target/release/deps/ladle-* \
              target/release/deps/libladle-* target/release/ladle target/release/ladle.d

# The crate: build.rs, the SQL migrations (embedded at compile time) and the sources.
# The release profile keeps line tables for backtraces; compress them rather than strip them.
COPY build.rs ./
COPY migrations ./migrations
# The vendored Swagger UI that GET /docs serves is embedded in the binary (include_bytes!).
COPY assets ./assets
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin ladle \
    && objcopy --compress-debug-sections=zlib target/release/ladle /usr/local/bin/ladle \
    && /usr/local/bin/ladle --version

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid/gid (Kubernetes manifests use runAsUser 10001). /data belongs to it
# before VOLUME so that fresh named/anonymous volumes inherit the ownership.
RUN groupadd --system --gid 10001 ladle \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
               --shell /usr/sbin/nologin ladle \
    && mkdir -p /data \
    && chown 10001:10001 /data

COPY --from=builder /usr/local/bin/ladle /usr/local/bin/ladle

ENV LADLE_BIND=0.0.0.0:8080 \
    LADLE_DATA_DIR=/data

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# No HEALTHCHECK: orchestrators probe GET /healthz (liveness) and GET /readyz (readiness);
# the slim image has no HTTP client anyway.
ENTRYPOINT ["ladle"]
CMD ["serve"]
