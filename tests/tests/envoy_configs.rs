//! The Envoy configurations kvmesh ships: every variant of the harness's
//! gateway (`envoy/gateway.yaml.j2`) and the examples in `envoy/examples/`,
//! rendered from the same templates, pass `envoy --mode validate` with the
//! built filter (validation starts the filter, so it also checks the
//! filter's configuration), and the committed examples are exactly what the
//! templates render today.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kvmesh_config::{DisaggregationPolicy, EngineKind};
use kvmesh_stack::harness::envoy::{
    validate_config, Disaggregation, FallbackBalancing, GatewayLimits, ENVOY_WORKER_THREADS,
    INFERENCE_PATHS,
};
use kvmesh_stack::harness::{free_port, paths, GatewayConfig, ModelRoute, SidecarEndpoints};
use serde_json::{json, Value};

/// Set to rewrite the committed examples from the templates.
const BLESS: &str = "KVMESH_BLESS";
/// Where the examples expect the filter. Envoy refuses a wasm path that does
/// not exist, so validation renders them with the built filter instead.
const EXAMPLE_WASM: &str = "/etc/kvmesh/kvmesh_filter.wasm";

/// What a rendered example is to Envoy.
#[derive(Clone, Copy)]
enum Piece {
    /// A whole bootstrap configuration.
    Bootstrap,
    /// Items of an HttpConnectionManager's `http_filters`.
    HttpFilters,
    /// Items of `static_resources.clusters`.
    Clusters,
}

/// Each example in `envoy/examples/`, rendered from `envoy/<name>.j2`.
const EXAMPLES: [(&str, Piece); 4] = [
    ("gateway.yaml", Piece::Bootstrap),
    ("http-filter.yaml", Piece::HttpFilters),
    ("pool-cluster.yaml", Piece::Clusters),
    ("sidecar-clusters.yaml", Piece::Clusters),
];

/// One model on two local workers, with the sidecar on its default
/// listeners (`kv-sidecar serve`'s `listen`). These are the committed
/// examples' own values; `envoy --mode validate` never binds them.
fn example_config(wasm_path: &Path) -> GatewayConfig {
    let workers = vec!["127.0.0.1:8001".to_owned(), "127.0.0.1:8002".to_owned()];
    GatewayConfig {
        listen_address: "0.0.0.0".to_owned(),
        gateway_port: 8080,
        admin_port: 9901,
        max_body_bytes: None,
        models: vec![ModelRoute::new("Qwen/Qwen3-0.6B", 16, workers)],
        wasm_path: wasm_path.to_owned(),
        sidecar: Some(SidecarEndpoints {
            grpc: "127.0.0.1:9101".to_owned(),
            http: "127.0.0.1:9100".to_owned(),
        }),
        sidecar_replicas: Vec::new(),
        debug_headers: false,
        worker_threads: ENVOY_WORKER_THREADS,
        filter: true,
        fallback: FallbackBalancing::LeastRequest,
        tokenize_timeout_ms: None,
        inference_paths: INFERENCE_PATHS.map(str::to_owned).to_vec(),
        expose_engine_headers: false,
        limits: GatewayLimits::default(),
    }
}

fn render_example(config: &GatewayConfig, name: &str) -> String {
    let template = format!("{name}.j2");
    let body = config
        .render(&paths::envoy_config_dir().join(&template))
        .unwrap();
    format!(
        "# Generated from envoy/{template} by tests/tests/envoy_configs.rs: edit the\n\
         # template, then run KVMESH_BLESS=1 cargo test -p kvmesh-tests --test envoy_configs\n\
         #\n\
         {body}\n"
    )
}

fn examples_dir() -> PathBuf {
    paths::envoy_config_dir().join("examples")
}

#[test]
fn committed_examples_are_what_the_templates_render() {
    let config = example_config(Path::new(EXAMPLE_WASM));
    let bless = std::env::var_os(BLESS).is_some();
    let mut stale = Vec::new();
    for (name, _) in EXAMPLES {
        let rendered = render_example(&config, name);
        let path = examples_dir().join(name);
        if bless {
            std::fs::write(&path, rendered).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(rendered.as_str()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "in envoy/examples, {} differ from what their templates render; \
         regenerate with: {BLESS}=1 cargo test -p kvmesh-tests --test envoy_configs",
        stale.join(", ")
    );
}

#[test]
fn envoy_accepts_the_examples() {
    let config = example_config(&paths::filter_wasm().unwrap());
    let dir = tempfile::tempdir().unwrap();
    for (name, piece) in EXAMPLES {
        let rendered = render_example(&config, name);
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, bootstrap(piece, &rendered).to_string()).unwrap();
        let (accepted, output) = validate_config(&path).unwrap();
        assert!(accepted, "envoy rejected examples/{name}:\n{output}");
    }
}

/// `rendered` as a bootstrap Envoy can validate: the pieces inside the
/// least configuration that holds them.
fn bootstrap(piece: Piece, rendered: &str) -> Value {
    let value: Value = serde_norway::from_str(rendered).unwrap();
    match piece {
        Piece::Bootstrap => value,
        Piece::Clusters => json!({"static_resources": {"clusters": value}}),
        Piece::HttpFilters => {
            let mut filters = value.as_array().cloned().unwrap();
            filters.push(json!({
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                }
            }));
            json!({"static_resources": {"listeners": [{
                "name": "validate",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "validate",
                        "route_config": {"virtual_hosts": [{
                            "name": "all",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}]
                        }]},
                        "http_filters": filters
                    }
                }]}]
            }]}})
        }
    }
}

#[test]
fn envoy_accepts_every_gateway_variant() {
    let address = || format!("127.0.0.1:{}", free_port());
    let endpoints = vec![address(), address()];
    let standalone = GatewayConfig::new(vec![ModelRoute::new("qwen3", 16, endpoints)]).unwrap();
    let mut with_sidecar = standalone.clone();
    with_sidecar.sidecar = Some(SidecarEndpoints {
        grpc: address(),
        http: address(),
    });
    let mut plain = standalone.clone();
    plain.filter = false;
    let mut round_robin = with_sidecar.clone();
    round_robin.fallback = FallbackBalancing::RoundRobin;
    let mut disaggregated = with_sidecar.clone();
    disaggregated.models[0].disaggregation = Some(Disaggregation::new(
        DisaggregationPolicy::Auto,
        EngineKind::Vllm,
        vec![address()],
    ));
    let dir = tempfile::tempdir().unwrap();
    let template = paths::envoy_config_dir().join("gateway.yaml.j2");
    for (variant, config) in [
        ("standalone", &standalone),
        ("sidecar", &with_sidecar),
        ("plain", &plain),
        ("round_robin", &round_robin),
        ("disaggregated", &disaggregated),
    ] {
        let path = dir.path().join(format!("{variant}.yaml"));
        std::fs::write(&path, config.render(&template).unwrap()).unwrap();
        let (accepted, output) = validate_config(&path).unwrap();
        assert!(
            accepted,
            "envoy rejected gateway.yaml.j2 ({variant}):\n{output}"
        );
    }
}
