//! Generates the `kvmesh.v1.StateStream` gRPC server and client with
//! tonic-build's `manual` module: no protoc on the build machines, and the
//! message types are router-core's hand-written prost structs.

fn main() {
    let subscribe = tonic_build::manual::Method::builder()
        .name("subscribe")
        .route_name("Subscribe")
        .input_type("router_core::gateway::GatewayReport")
        .output_type("router_core::state_stream::StateUpdate")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("StateStream")
        .package("kvmesh.v1")
        .method(subscribe)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
