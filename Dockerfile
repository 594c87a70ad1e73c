# sluice in a container: a build stage with the Rust toolchain, and a small runtime stage with the
# binary, a default config and a non-root user.
#
#   docker build -t sluice .
#   openssl rand -hex 32 > admin.token
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9900:9900 \
#     --mount type=bind,src="$PWD/admin.token",dst=/run/secrets/sluice_admin_token,ro sluice
#
# The default config (packaging/container.toml) proxies to a placeholder backend: mount your own
# file over /etc/sluice/sluice.toml. The image runs `sluice check` on it before starting.

# wasmtime 48 needs Rust 1.95 or newer.
FROM rust:1.95-bookworm AS build
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add wasm32-unknown-unknown
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice \
 && install -D -m 0755 target/release/sluice /out/sluice

FROM debian:bookworm-slim
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sluice \
 && install -d -o sluice -g sluice -m 0750 /etc/sluice /run/sluice
COPY --from=build /out/sluice /usr/local/bin/sluice
COPY packaging/container.toml /etc/sluice/sluice.toml
USER sluice
EXPOSE 8080 9900
STOPSIGNAL SIGTERM
# tini forwards SIGTERM/SIGHUP to sluice (graceful stop / reload) and reaps children.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/bin/sh", "-c", "sluice check --config /etc/sluice/sluice.toml && exec sluice run --config /etc/sluice/sluice.toml"]
