//! The `istio/` manifests, proven offline: every resource validates against
//! Istio's CRD schemas and Kubernetes' own schemas; the configs they carry
//! are accepted by `kv-sidecar check-config` and `nats-server -t`; the
//! gateway EnvoyFilter, applied to a stand-in of istiod's gateway config as
//! istiod would, passes `envoy --mode validate` and routes by KV cache in a
//! real Envoy with the real filter; the Grafana dashboard only queries
//! metrics the running components export; `scripts/package-wasm` writes an
//! OCI image layout holding the module.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvmesh_config::{DisaggregationPolicy, EngineKind};
use kvmesh_stack::harness::client::{http_client, post_json};
use kvmesh_stack::harness::envoy::{validate_config, PREFILL_POOL};
use kvmesh_stack::harness::istio::{apply_envoy_filter, outbound_cluster};
use kvmesh_stack::harness::nats_tap::NatsTap;
use kvmesh_stack::harness::process::run_to_completion;
use kvmesh_stack::harness::readiness::poll_until;
use kvmesh_stack::harness::stack::{Stack, StackOptions};
use kvmesh_stack::harness::{paths, Envoy, GatewayConfig};
use router_core::protocol::subjects;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The model the manifests serve.
const MODEL: &str = "Qwen/Qwen3-8B";
const NAMESPACE: &str = "kvmesh.svc.cluster.local";

fn istio_dir() -> PathBuf {
    paths::repo_root().join("istio")
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .collect()
}

fn validate_manifests(dir: &Path) -> (bool, String) {
    let mut command = Command::new(paths::repo_root().join("scripts/validate-manifests"));
    command.arg(dir);
    run_to_completion(command).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn every_manifest_validates_against_the_istio_and_kubernetes_schemas() {
    let (ok, out) = validate_manifests(&istio_dir());
    assert!(ok, "{out}");

    // The validator is strict: an unknown field, a wrong enum and a missing
    // resource are each reported.
    let broken = tempfile::tempdir().unwrap();
    copy_dir(&istio_dir(), broken.path());
    let edit = |file: &str, from: &str, to: &str| {
        let path = broken.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no '{from}'");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    edit("kv-sidecar/deployment.yaml", "replicas: 2", "replicaz: 2");
    edit(
        "gateway/envoyfilter.yaml",
        "applyTo: HTTP_FILTER",
        "applyTo: HTTP_FILTERS",
    );
    edit("kustomization.yaml", "- pools.yaml", "- pool.yaml");
    let (ok, out) = validate_manifests(broken.path());
    assert!(!ok, "{out}");
    for expected in [
        "'replicaz' was unexpected",
        "'HTTP_FILTERS' is not one of",
        "pool.yaml does not exist",
    ] {
        assert!(out.contains(expected), "'{expected}' missing:\n{out}");
    }
}

fn config_map_entry(file: &str, key: &str) -> String {
    let documents = yaml_documents(&istio_dir().join(file));
    documents[0]["data"][key].as_str().unwrap().to_owned()
}

#[test]
fn the_sidecar_and_nats_configurations_in_the_manifests_are_accepted() {
    let secrets = tempfile::tempdir().unwrap();
    let password = secrets.path().join("password");
    std::fs::write(&password, "not-a-real-password\n").unwrap();
    let tokenizer = paths::qwen3_tokenizer_dir().unwrap().join("tokenizer.json");
    let sidecar_config = config_map_entry("kv-sidecar/configmap.yaml", "kvmesh.yaml")
        .replace(
            "/models/tokenizer/tokenizer.json",
            &tokenizer.display().to_string(),
        )
        .replace("/etc/kvmesh/nats/password", &password.display().to_string());
    let (ok, out) = kvmesh_stack::harness::sidecar::check_config(&sidecar_config).unwrap();
    assert!(
        ok,
        "kv-sidecar check-config refused the ConfigMap's kvmesh.yaml:\n{out}"
    );

    let nats_config = secrets.path().join("nats.conf");
    std::fs::write(
        &nats_config,
        config_map_entry("nats/configmap.yaml", "nats.conf"),
    )
    .unwrap();
    let mut command = Command::new(paths::nats_server_binary().unwrap());
    command
        .arg("-t")
        .arg("-c")
        .arg(&nats_config)
        .env("POD_NAME", "nats-0")
        .env("NATS_PASSWORD", "not-a-real-password");
    let (ok, out) = run_to_completion(command).unwrap();
    assert!(
        ok,
        "nats-server -t refused the ConfigMap's nats.conf: {out}"
    );
}

/// The gateway EnvoyFilter applied to istiod's gateway config for `stack`'s
/// pools; the kv-sidecar Service's DNS name stands for `stack`'s sidecar.
fn istio_gateway_config(stack: &Stack) -> (GatewayConfig, Value) {
    let mut route = stack.model_route();
    route.cluster = Some(outbound_cluster(
        &format!("kvmesh-decode.{NAMESPACE}"),
        8000,
    ));
    if let Some(disaggregation) = &mut route.disaggregation {
        assert_eq!(disaggregation.prefill_cluster, PREFILL_POOL);
        disaggregation.prefill_cluster =
            outbound_cluster(&format!("kvmesh-prefill.{NAMESPACE}"), 8000);
    }
    let gateway = GatewayConfig::new(vec![route]).unwrap();
    let base = gateway
        .render(&paths::repo_root().join("tests/data/istio-gateway.yaml.j2"))
        .unwrap();
    let mut bootstrap: Value = serde_norway::from_str(&base).unwrap();
    let envoy_filter = &yaml_documents(&istio_dir().join("gateway/envoyfilter.yaml"))[0];
    apply_envoy_filter(&mut bootstrap, envoy_filter, &paths::filter_wasm().unwrap()).unwrap();

    let sidecar = stack.sidecar.endpoints();
    for cluster in bootstrap["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap()
    {
        let local = match cluster["name"].as_str() {
            Some("kv_sidecar") => &sidecar.grpc,
            Some("kv_sidecar_http") => &sidecar.http,
            _ => continue,
        };
        let (ip, port) = local.rsplit_once(':').unwrap();
        cluster["type"] = json!("STATIC");
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] =
            json!({"socket_address": {"address": ip, "port_value": port.parse::<u16>().unwrap()}});
    }
    (gateway, bootstrap)
}

fn envoy_validate(config: &Value) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.json");
    std::fs::write(&path, serde_json::to_string_pretty(config).unwrap()).unwrap();
    validate_config(&path).unwrap()
}

fn token_prompt(prefix: u32, length: u32, tail: u32) -> Value {
    let mut prompt: Vec<u32> = (0..length).map(|t| 1_000 + prefix * 7_919 + t).collect();
    prompt.extend((0..16).map(|t| 90_000 + tail * 16 + t));
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 4})
}

#[test]
fn the_gateway_envoyfilter_merged_into_istios_gateway_config_routes_by_kv_cache() {
    let options =
        StackOptions::disaggregated(MODEL, 2, 1, DisaggregationPolicy::Auto, EngineKind::Vllm)
            .unwrap();
    let mut stack = Stack::start(options, |_| {}).unwrap();
    let (gateway, merged) = istio_gateway_config(&stack);

    let (ok, out) = envoy_validate(&merged);
    assert!(
        ok,
        "envoy --mode validate refused the merged config:\n{out}"
    );
    let filters = merged["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = filters.iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(names, ["kvmesh", "envoy.filters.http.router"]);

    let vms = gateway.filter_vms();
    let envoy = Envoy::start_with_text(gateway, &serde_json::to_string(&merged).unwrap()).unwrap();
    poll_until(
        "the Istio gateway's filter VMs to hold fleet state",
        Duration::from_secs(30),
        || {
            envoy
                .stat("wasmcustom.kvmesh_state_synced_vms")
                .unwrap_or(0)
                >= vms
        },
    )
    .unwrap();

    // Prompts below min_prefill_tokens (1024) stay on the decode pool; each
    // follow-up lands where its prefix is cached.
    let client = http_client();
    let url = format!("{}/v1/completions", envoy.gateway_url());
    for prefix in 0..4 {
        let first = post_json(&client, &url, &token_prompt(prefix, 512, 0)).unwrap();
        assert_eq!(first.status, 200, "{}", first.text);
        // The KV events reach the filter through NATS and the sidecar.
        std::thread::sleep(Duration::from_millis(300));
        let second = post_json(&client, &url, &token_prompt(prefix, 512, 1)).unwrap();
        assert_eq!(
            second.sim_worker().unwrap(),
            first.sim_worker().unwrap(),
            "prefix {prefix}"
        );
        assert!(
            second.cached_tokens() >= 512,
            "prefix {prefix}: {}",
            second.text
        );
    }
    assert!(envoy.stat("wasmcustom.kvmesh_requests_precise").unwrap() >= 8);

    // A long uncached prompt is prefilled on the prefill pool through its
    // Istio cluster, and decoded without recomputing it.
    let long = post_json(&client, &url, &token_prompt(9, 2_048, 0)).unwrap();
    assert_eq!(long.status, 200, "{}", long.text);
    assert_eq!(envoy.stat("wasmcustom.kvmesh_remote_prefills").unwrap(), 1);
    assert_eq!(envoy.stat("wasmcustom.kvmesh_prefill_failures").unwrap(), 0);
    assert!(long.cached_tokens() >= 2_048, "{}", long.text);

    dashboard_queries_only_exported_metrics(&stack, &envoy);

    let counter = |name: &str| envoy.stat(&format!("wasmcustom.{name}")).unwrap();
    let send_four = |from: u32| {
        for prefix in from..from + 4 {
            let response = post_json(&client, &url, &token_prompt(prefix, 512, 0)).unwrap();
            assert_eq!(response.status, 200, "{}", response.text);
        }
    };

    // NATS gone: the sidecar keeps the workers it last heard instead of
    // expiring them and tells the filters it lost the fleet, so they route
    // approximately over those workers, not by Envoy's own pick (the
    // manifests list no endpoints).
    let known_workers = stack.sidecar.known_workers().unwrap();
    stack.nats.process().kill();
    poll_until(
        "the filter VMs to hear that the sidecar lost the fleet",
        Duration::from_secs(30),
        || counter("kvmesh_state_synced_vms") == 0,
    )
    .unwrap();
    let (precise, approximate, fallback) = (
        counter("kvmesh_requests_precise"),
        counter("kvmesh_requests_approximate"),
        counter("kvmesh_requests_fallback"),
    );
    // Past the sidecar's worker timeout (2.5 s).
    std::thread::sleep(Duration::from_secs(3));
    send_four(10);
    assert_eq!(counter("kvmesh_requests_approximate"), approximate + 4);
    assert_eq!(counter("kvmesh_requests_fallback"), fallback);
    assert_eq!(counter("kvmesh_requests_precise"), precise);
    assert_eq!(stack.sidecar.known_workers().unwrap(), known_workers);
    stack.nats.restart().unwrap();
    poll_until(
        "the filter VMs to hold current fleet state again",
        Duration::from_secs(30),
        || counter("kvmesh_state_synced_vms") == vms,
    )
    .unwrap();
    send_four(14);
    assert_eq!(counter("kvmesh_requests_precise"), precise + 4);

    // The sidecar gone: again the workers of the last fleet state the
    // filter heard are the candidates.
    stack.sidecar.process().kill();
    poll_until(
        "the filter VMs to see their fleet state go stale",
        Duration::from_secs(30),
        || {
            envoy
                .stat("wasmcustom.kvmesh_state_synced_vms")
                .unwrap_or(vms)
                == 0
        },
    )
    .unwrap();
    // Past the staleness limit (`sidecar.stale_after_ms`, 5 s by default).
    std::thread::sleep(Duration::from_secs(6));
    let (approximate, fallback, stale) = (
        counter("kvmesh_requests_approximate"),
        counter("kvmesh_requests_fallback"),
        counter("kvmesh_requests_stale_state"),
    );
    send_four(20);
    assert_eq!(counter("kvmesh_requests_stale_state"), stale + 4);
    assert_eq!(counter("kvmesh_requests_approximate"), approximate + 4);
    assert_eq!(counter("kvmesh_requests_fallback"), fallback);
}

/// Every metric the Grafana dashboard queries is one the gateway, the
/// sidecar or an engine exports.
fn dashboard_queries_only_exported_metrics(stack: &Stack, envoy: &Envoy) {
    // Labelled families appear once they have a sample: one bad message.
    let tap = NatsTap::subscribe(&stack.nats.url(), "kvmesh.>").unwrap();
    tap.publish(&subjects::load("kvmesh", MODEL, "bogus"), b"not protobuf")
        .unwrap();
    poll_until(
        "the malformed message to be counted",
        Duration::from_secs(10),
        || {
            stack
                .sidecar
                .metric("kvmesh_serve_malformed_messages_total", "")
                >= 1.0
        },
    )
    .unwrap();
    let scrape = |url: String| reqwest::blocking::get(url).unwrap().text().unwrap();
    let exported = [
        envoy.prometheus_stats().unwrap(),
        scrape(format!("{}/metrics", stack.sidecar.http_url())),
        scrape(format!("{}/metrics", stack.workers[0].sim.url())),
    ]
    .join("\n");
    let is_exported = |metric: &str| {
        let base = metric
            .trim_end_matches("_bucket")
            .trim_end_matches("_total");
        exported.lines().any(|line| {
            line.starts_with(&format!("{metric} "))
                || line.starts_with(&format!("{metric}{{"))
                || line.starts_with(&format!("# TYPE {base} "))
        })
    };
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(istio_dir().join("grafana/kvmesh-dashboard.json")).unwrap(),
    )
    .unwrap();
    let names = dashboard_metric_names(&dashboard);
    assert!(names.len() > 20, "{names:?}");
    let missing: Vec<&String> = names.iter().filter(|m| !is_exported(m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}"
    );
}

/// Metric names in the dashboard's PromQL: identifiers that start with
/// `kvmesh_` or `vllm:`.
fn dashboard_metric_names(dashboard: &Value) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for start in expr
                .match_indices("kvmesh_")
                .chain(expr.match_indices("vllm:"))
            {
                let name: String = expr[start.0..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                names.insert(name);
            }
        }
    }
    names
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The blob a descriptor names, checked against its digest and size.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let data = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(
        sha256_hex(&data),
        hex,
        "blob content does not match its digest"
    );
    assert_eq!(descriptor["size"].as_u64().unwrap(), data.len() as u64);
    data
}

#[test]
fn package_wasm_writes_an_oci_image_layout_holding_the_module() {
    let out = tempfile::tempdir().unwrap();
    let wasm_path = paths::filter_wasm().unwrap();
    let output = Command::new("python3")
        .arg(paths::repo_root().join("scripts/package_wasm.py"))
        .arg("--wasm")
        .arg(&wasm_path)
        .arg("--out")
        .arg(out.path())
        .args(["--tag", "9.9.9"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    let wasm = std::fs::read(&wasm_path).unwrap();
    assert!(
        printed.contains(&format!("plugin.wasm sha256: {}", sha256_hex(&wasm))),
        "{printed}"
    );

    let layout = out.path().join("kvmesh-filter-oci");
    let oci_layout: Value =
        serde_json::from_str(&std::fs::read_to_string(layout.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(oci_layout["imageLayoutVersion"], "1.0.0");
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(layout.join("index.json")).unwrap()).unwrap();
    let descriptor = &index["manifests"][0];
    assert_eq!(
        descriptor["annotations"]["org.opencontainers.image.ref.name"],
        "9.9.9"
    );
    let manifest: Value = serde_json::from_slice(&blob(&layout, descriptor)).unwrap();
    assert!(
        printed.contains(descriptor["digest"].as_str().unwrap()),
        "{printed}"
    );
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config: Value = serde_json::from_slice(&blob(&layout, &manifest["config"])).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "Istio's compat image holds one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&blob(&layout, &layers[0])[..])
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", sha256_hex(&tar))
    );
    let mut archive = tar::Archive::new(&tar[..]);
    let mut entries: Vec<(String, Vec<u8>)> = archive
        .entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            (entry.path().unwrap().display().to_string(), data)
        })
        .collect();
    assert_eq!(entries.len(), 1);
    let (name, data) = entries.remove(0);
    assert_eq!(name, "plugin.wasm");
    assert!(
        data == wasm,
        "the layer's plugin.wasm is not the built filter"
    );
    assert!(out.path().join("kvmesh-filter-oci.tar").is_file());
}
