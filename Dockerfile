# The ghcr.io/kvmesh/kvmesh image the istio/ manifests run: kv-sidecar (serve
# and relay) and sim-engine. The filter ships separately (scripts/package-wasm).
#   docker build -t ghcr.io/kvmesh/kvmesh:0.1.0 .
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kv-sidecar -p sim-engine --bins

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kv-sidecar /src/target/release/sim-engine /usr/local/bin/
USER 65532:65532
