//! Every kvmesh configuration the repository ships, checked against the one
//! configuration model (`kvmesh-config`) by the parsers the programs use:
//! the sidecar YAML in `istio/`'s ConfigMaps, the filter JSON in `istio/`'s
//! EnvoyFilters and in `envoy/examples/`, and the filter JSON
//! `envoy/gateway.yaml.j2` renders. An
//! unknown or invalid field fails here, without Envoy or a cluster; and the
//! models the gateway and the sidecar share must agree, so `/debug/route`
//! decides as the gateway does.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kv_sidecar::serve::config::Config as SidecarConfig;
use kvmesh_config::{DisaggregationPolicy, DisaggregationSpec, EngineKind, ModelSpec};
use kvmesh_filter::config::PluginConfig;
use kvmesh_stack::harness::envoy::Disaggregation;
use kvmesh_stack::harness::{
    free_port, paths, FallbackBalancing, GatewayConfig, GatewayLimits, ModelRoute, SidecarEndpoints,
};
use serde_json::Value;

/// Where the filter's JSON sits in an Envoy Wasm filter's config.
const WASM_CONFIG: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            found.push(path);
        }
    }
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .collect()
}

/// The kvmesh filter configurations (JSON strings) anywhere in `value`.
fn filter_configs(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_CONFIG) {
                let config = &map["config"];
                if config["root_id"] == "kvmesh" {
                    let json = config["configuration"]["value"].as_str().unwrap();
                    found.push(json.to_owned());
                }
            }
            map.values().for_each(|v| filter_configs(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| filter_configs(v, found)),
        _ => {}
    }
}

/// The sidecar's own checks include that its files exist: every absolute
/// path becomes an empty stand-in file.
fn with_stand_in_files(value: &mut Value, dir: &Path) {
    match value {
        Value::String(text) if text.starts_with('/') => {
            let stand_in = dir.join(text.trim_start_matches('/').replace('/', "_"));
            std::fs::write(&stand_in, "").unwrap();
            *text = stand_in.display().to_string();
        }
        Value::Object(map) => map.values_mut().for_each(|v| with_stand_in_files(v, dir)),
        Value::Array(items) => items.iter_mut().for_each(|v| with_stand_in_files(v, dir)),
        _ => {}
    }
}

fn parse_sidecar(yaml: &str, origin: &str) -> SidecarConfig {
    let dir = tempfile::tempdir().unwrap();
    let mut value: Value = serde_norway::from_str(yaml).unwrap();
    with_stand_in_files(&mut value, dir.path());
    let yaml = serde_norway::to_string(&value).unwrap();
    SidecarConfig::parse(&yaml, origin).unwrap_or_else(|e| panic!("{origin}:\n{e}"))
}

fn parse_filter(json: &str, origin: &str) -> PluginConfig {
    PluginConfig::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{origin}:\n{e}"))
}

/// What the gateway and the sidecar must agree on for one model.
#[derive(Debug, PartialEq)]
struct Decision {
    block_size: u32,
    overlap_weight: f64,
    temperature: f64,
    disaggregation: Option<DisaggregationSpec>,
}

fn filter_decisions(config: &PluginConfig) -> BTreeMap<String, Decision> {
    config
        .models()
        .map(|m| {
            let decision = Decision {
                block_size: m.hasher.block_size().get(),
                overlap_weight: m.routing.weights.overlap_weight,
                temperature: m.routing.weights.temperature,
                disaggregation: m.disaggregation.as_ref().map(|d| d.routing.spec),
            };
            (m.name.clone(), decision)
        })
        .collect()
}

fn sidecar_decision(spec: &ModelSpec) -> Decision {
    Decision {
        block_size: spec.block_size,
        overlap_weight: spec.overlap_weight,
        temperature: spec.temperature,
        disaggregation: spec.remote_prefill().map(|d| d.shared),
    }
}

#[test]
fn every_config_in_istio_is_valid_and_the_gateway_and_sidecar_agree() {
    let mut files = Vec::new();
    yaml_files(&paths::repo_root().join("istio"), &mut files);
    files.sort();
    let (mut sidecars, mut filters) = (Vec::new(), Vec::new());
    for file in &files {
        let origin = file.display().to_string();
        for document in yaml_documents(&std::fs::read_to_string(file).unwrap()) {
            if document["kind"] == "ConfigMap" {
                if let Some(yaml) = document["data"]["kvmesh.yaml"].as_str() {
                    sidecars.push(parse_sidecar(yaml, &origin));
                }
            }
            let mut found = Vec::new();
            filter_configs(&document, &mut found);
            filters.extend(found.iter().map(|json| parse_filter(json, &origin)));
        }
    }
    assert_eq!(
        (sidecars.len(), filters.len()),
        (1, 1),
        "one sidecar ConfigMap and one gateway EnvoyFilter"
    );
    let gateway = filter_decisions(&filters[0]);
    let sidecar: BTreeMap<String, Decision> = sidecars[0]
        .models
        .iter()
        .map(|m| (m.name.clone(), sidecar_decision(m)))
        .collect();
    assert_eq!(gateway, sidecar);
}

#[test]
fn every_filter_config_in_the_envoy_examples_is_valid() {
    let mut files = Vec::new();
    yaml_files(&paths::envoy_config_dir().join("examples"), &mut files);
    let mut found = 0;
    for file in &files {
        let mut configs = Vec::new();
        for document in yaml_documents(&std::fs::read_to_string(file).unwrap()) {
            filter_configs(&document, &mut configs);
        }
        for json in &configs {
            parse_filter(json, &file.display().to_string());
        }
        found += configs.len();
    }
    assert!(
        found >= 2,
        "the gateway and http-filter examples carry the filter"
    );
}

#[test]
fn the_envoy_template_renders_a_valid_filter_config() {
    // Only rendered, never bound; free ports keep the test hermetic anyway.
    let address = || format!("127.0.0.1:{}", free_port());
    let mut decode_pool = ModelRoute::new("m", 32, vec![address()]);
    decode_pool.overlap_weight = Some(2.0);
    let mut disaggregated = ModelRoute::new("d", 16, vec![address()]);
    disaggregated.cluster = Some("d_pool".into());
    let mut disaggregation = Disaggregation::new(
        DisaggregationPolicy::Auto,
        EngineKind::Sglang,
        vec![address()],
    );
    disaggregation.min_prefill_tokens = Some(512);
    disaggregation.bootstrap_port = Some(free_port());
    disaggregation.timeout_ms = Some(1000);
    disaggregated.disaggregation = Some(disaggregation);
    let gateway = GatewayConfig {
        listen_address: "127.0.0.1".into(),
        gateway_port: free_port(),
        admin_port: free_port(),
        max_body_bytes: Some(1 << 20),
        models: vec![decode_pool, disaggregated],
        wasm_path: PathBuf::from("kvmesh_filter.wasm"),
        sidecar: Some(SidecarEndpoints {
            grpc: address(),
            http: address(),
        }),
        sidecar_replicas: Vec::new(),
        debug_headers: true,
        worker_threads: 2,
        filter: true,
        fallback: FallbackBalancing::LeastRequest,
        tokenize_timeout_ms: Some(100),
        inference_paths: vec!["/v1/completions".into()],
        expose_engine_headers: false,
        limits: GatewayLimits::default(),
    };
    let template = paths::envoy_config_dir().join("gateway.yaml.j2");
    let rendered = gateway.render(&template).unwrap();
    let mut found = Vec::new();
    for document in yaml_documents(&rendered) {
        filter_configs(&document, &mut found);
    }
    assert_eq!(
        found.len(),
        1,
        "one kvmesh filter in {}",
        template.display()
    );
    let config = parse_filter(&found[0], &template.display().to_string());
    let decisions = filter_decisions(&config);
    assert_eq!(decisions["m"].overlap_weight, 2.0);
    assert_eq!(decisions["m"].block_size, 32);
    assert_eq!(
        decisions["d"].disaggregation,
        Some(DisaggregationSpec {
            policy: DisaggregationPolicy::Auto,
            min_prefill_tokens: 512,
            max_prefill_queue_tokens: 262_144,
            max_prefill_lag_tokens: DisaggregationSpec::DEFAULT_MAX_PREFILL_LAG_TOKENS,
            shared_workers: false,
        })
    );
    let d = config.model("d").unwrap().disaggregation.as_ref().unwrap();
    assert_eq!(d.protocol, EngineKind::Sglang);
    assert!(config.sidecar.is_some() && config.debug_headers);
}
