# The S3-compatible server of deploy/compose.yaml: s3s-fs 0.14.1, built from its crates.io
# release (https://crates.io/crates/s3s-fs, source https://github.com/Nugine/s3s) with its
# lock file (--locked). It is the server ladle's tests and CI run against (.ci/run installs the
# same version), so the compose stack exercises the S3 path that is tested. It stores each
# bucket as a folder and each object as a file; it is small and unhardened: point ladle at a
# real S3 service (AWS S3, Garage, Ceph RGW, ...) in production.
# 0.15+ needs rustc >= 1.96; the builder matches ladle's (Dockerfile).
FROM rust:1.95-bookworm AS build
RUN cargo install s3s-fs@0.14.1 --features binary --locked --root /out

FROM debian:bookworm-slim
# curl: the health check and the bucket creation (SigV4-signed CreateBucket, curl >= 7.75).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10002 s3 \
    && useradd --system --uid 10002 --gid 10002 --no-create-home --shell /usr/sbin/nologin s3 \
    && mkdir -p /data && chown 10002:10002 /data
COPY --from=build /out/bin/s3s-fs /usr/local/bin/s3s-fs
USER 10002:10002
VOLUME ["/data"]
EXPOSE 9000
ENTRYPOINT ["s3s-fs"]
