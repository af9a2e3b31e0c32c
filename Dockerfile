# kvinject container image: a static binary on an empty base, non-root, with CA roots
# (the Azure SDK's TLS needs them). Build: docker build -t kvinject .
# Not built on the development machine (it has no Docker engine); the build stage runs
# `cargo build --locked`, the same lock file CI tests.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools cmake && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin kvinject

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/kvinject /kvinject
USER 65532:65532
ENTRYPOINT ["/kvinject"]
CMD ["serve"]
