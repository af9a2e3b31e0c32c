# kvinject container image: one static binary on an empty base, non-root, with CA roots
# (the Azure SDK's and the Kubernetes client's TLS need a root store).
#
#   docker build -t <your-registry>/kvinject:0.1.0 .
#   (or: podman build / buildah bud / kaniko, same file)
#
# Reproducible inputs: the toolchain image is pinned by version (pin it by digest in your
# pipeline), dependencies by Cargo.lock (`--locked`); the image holds only the binary and
# the CA roots. Not built on the development machine (it has no container engine).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools cmake ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Only the binary is built; the test and bench sources are copied because the manifest
# names them.
COPY tests ./tests
COPY benches ./benches
RUN cargo build --profile dist --locked --target x86_64-unknown-linux-musl --bin kvinject

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/x86_64-unknown-linux-musl/dist/kvinject /kvinject
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
ENTRYPOINT ["/kvinject"]
CMD ["serve"]
