//! Applies an Istio `EnvoyFilter` to an Envoy configuration the way istiod
//! and istio-agent do, for the operations kvmesh's manifests use; anything
//! else is an error, so a new kind of patch cannot go untested.
//!
//! * `EXTENSION_CONFIG` `ADD`: an ECDS resource. The filter that names it in
//!   `config_discovery` gets its `typed_config` (what Envoy runs once ECDS
//!   delivers it), and remote Wasm code becomes the local module (what
//!   istio-agent does after downloading and checking it).
//! * `HTTP_FILTER` `INSERT_BEFORE` a sub-filter of a network filter, in
//!   every listener or (`listener.portNumber`) in the gateway listener of
//!   that port, which Istio names `0.0.0.0_<port>`.
//! * `CLUSTER` `MERGE` (matched by service and port: Istio's
//!   `outbound|<port>||<service>` names) with protobuf merge semantics:
//!   messages merge field by field, lists append, scalars replace.
//! * `CLUSTER` `ADD`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

/// Applies every patch of `envoy_filter` (the resource as JSON) to
/// `bootstrap`; remote Wasm code is replaced by `wasm_module`.
pub fn apply_envoy_filter(
    bootstrap: &mut Value,
    envoy_filter: &Value,
    wasm_module: &Path,
) -> anyhow::Result<()> {
    let patches = envoy_filter["spec"]["configPatches"]
        .as_array()
        .context("spec.configPatches is not a list")?;
    let mut extension_configs = HashMap::new();
    for (index, patch) in patches.iter().enumerate() {
        let apply_to = patch["applyTo"].as_str().unwrap_or_default();
        let operation = patch["patch"]["operation"].as_str().unwrap_or_default();
        let value = &patch["patch"]["value"];
        let at = || format!("configPatches[{index}] ({apply_to} {operation})");
        match (apply_to, operation) {
            ("EXTENSION_CONFIG", "ADD") => {
                let name = value["name"]
                    .as_str()
                    .with_context(|| format!("{}: no name", at()))?;
                let mut typed_config = value["typed_config"].clone();
                localize_wasm_code(&mut typed_config, wasm_module).with_context(at)?;
                extension_configs.insert(name.to_owned(), typed_config);
            }
            ("HTTP_FILTER", "INSERT_BEFORE") => {
                insert_http_filter(bootstrap, &patch["match"], value.clone()).with_context(at)?
            }
            ("CLUSTER", "MERGE") => {
                merge_cluster(bootstrap, &patch["match"], value).with_context(at)?
            }
            ("CLUSTER", "ADD") => clusters(bootstrap)?.push(value.clone()),
            _ => anyhow::bail!("{}: not emulated", at()),
        }
    }
    resolve_config_discovery(bootstrap, &extension_configs)
}

/// Istio's name of the outbound cluster of `service`'s `port`.
pub fn outbound_cluster(service: &str, port: u64) -> String {
    format!("outbound|{port}||{service}")
}

fn clusters(bootstrap: &mut Value) -> anyhow::Result<&mut Vec<Value>> {
    bootstrap["static_resources"]["clusters"]
        .as_array_mut()
        .context("the configuration has no static_resources.clusters")
}

/// What istio-agent does with a Wasm ECDS resource: fetch the module, check
/// its sha256, point Envoy at the local file.
fn localize_wasm_code(typed_config: &mut Value, wasm_module: &Path) -> anyhow::Result<()> {
    let code = &mut typed_config["config"]["vm_config"]["code"];
    let Some(remote) = code.get("remote") else {
        return Ok(());
    };
    let uri = remote["http_uri"]["uri"].as_str().unwrap_or_default();
    anyhow::ensure!(
        ["oci://", "https://", "http://"]
            .iter()
            .any(|s| uri.starts_with(s)),
        "remote Wasm uri '{uri}' is not oci://, https:// or http://"
    );
    anyhow::ensure!(
        remote["sha256"].as_str().is_some_and(|s| !s.is_empty()),
        "remote Wasm code without sha256"
    );
    *code = serde_json::json!({"local": {"filename": wasm_module.display().to_string()}});
    Ok(())
}

/// Every HTTP filter list in the listeners on `port` (all listeners when
/// `None`), with the name of the network filter (the connection manager)
/// that holds it.
fn http_filter_lists(
    bootstrap: &mut Value,
    port: Option<u64>,
) -> anyhow::Result<impl Iterator<Item = (String, &mut Vec<Value>)>> {
    let listeners = bootstrap["static_resources"]["listeners"]
        .as_array_mut()
        .context("the configuration has no static_resources.listeners")?;
    let suffix = port.map(|port| format!("_{port}"));
    Ok(listeners
        .iter_mut()
        .filter(move |l| {
            suffix
                .as_deref()
                .is_none_or(|suffix| l["name"].as_str().is_some_and(|n| n.ends_with(suffix)))
        })
        .filter_map(|l| l["filter_chains"].as_array_mut())
        .flatten()
        .filter_map(|c| c["filters"].as_array_mut())
        .flatten()
        .filter_map(|network| {
            let name = network["name"].as_str()?.to_owned();
            Some((
                name,
                network["typed_config"]["http_filters"].as_array_mut()?,
            ))
        }))
}

fn insert_http_filter(bootstrap: &mut Value, matcher: &Value, filter: Value) -> anyhow::Result<()> {
    let network_filter = matcher["listener"]["filterChain"]["filter"]["name"]
        .as_str()
        .context("match.listener.filterChain.filter.name is required")?;
    let before = matcher["listener"]["filterChain"]["filter"]["subFilter"]["name"]
        .as_str()
        .context("match...subFilter.name is required")?;
    let port = matcher["listener"]["portNumber"].as_u64();
    let mut inserted = 0;
    for (name, http_filters) in http_filter_lists(bootstrap, port)? {
        if name != network_filter {
            continue;
        }
        if let Some(position) = http_filters.iter().position(|f| f["name"] == before) {
            http_filters.insert(position, filter.clone());
            inserted += 1;
        }
    }
    anyhow::ensure!(
        inserted > 0,
        "no {network_filter} with {before} to insert before"
    );
    Ok(())
}

fn merge_cluster(bootstrap: &mut Value, matcher: &Value, patch: &Value) -> anyhow::Result<()> {
    let service = matcher["cluster"]["service"]
        .as_str()
        .context("match.cluster.service is required")?;
    let port = matcher["cluster"]["portNumber"]
        .as_u64()
        .context("match.cluster.portNumber is required")?;
    let name = outbound_cluster(service, port);
    let cluster = clusters(bootstrap)?
        .iter_mut()
        .find(|c| c["name"] == name.as_str())
        .with_context(|| format!("no cluster {name}"))?;
    merge(cluster, patch);
    Ok(())
}

/// Protobuf merge on JSON: objects recursively, lists appended, the rest
/// replaced.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                match target.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(target), Value::Array(patch)) => target.extend(patch.iter().cloned()),
        (target, patch) => *target = patch.clone(),
    }
}

/// Replaces every `config_discovery` HTTP filter with the extension config
/// it names.
fn resolve_config_discovery(
    bootstrap: &mut Value,
    extension_configs: &HashMap<String, Value>,
) -> anyhow::Result<()> {
    for http_filter in http_filter_lists(bootstrap, None)?.flat_map(|(_, list)| list.iter_mut()) {
        let Some(filter) = http_filter.as_object_mut() else {
            continue;
        };
        if filter.remove("config_discovery").is_none() {
            continue;
        }
        let name = filter["name"].as_str().unwrap_or_default().to_owned();
        let typed_config = extension_configs
            .get(&name)
            .with_context(|| format!("no extension config {name} for its config_discovery"))?;
        filter.insert("typed_config".to_owned(), typed_config.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_follows_protobuf_rules() {
        let mut cluster =
            json!({"name": "c", "lb_policy": "LEAST_REQUEST", "a": {"x": 1, "l": [1]}});
        merge(
            &mut cluster,
            &json!({"lb_policy": "RANDOM", "a": {"y": 2, "l": [2]}}),
        );
        assert_eq!(
            cluster,
            json!({"name": "c", "lb_policy": "RANDOM", "a": {"x": 1, "y": 2, "l": [1, 2]}})
        );
    }

    #[test]
    fn a_listener_port_scopes_an_http_filter_to_that_listener() {
        let listener = |name: &str| {
            json!({"name": name, "filter_chains": [{"filters": [{
                "name": "hcm",
                "typed_config": {"http_filters": [{"name": "router"}]}
            }]}]})
        };
        let mut bootstrap = json!({"static_resources": {
            "listeners": [listener("0.0.0.0_8080"), listener("0.0.0.0_8443")]
        }});
        let matcher = |port: u64| {
            json!({"listener": {"portNumber": port, "filterChain": {
                "filter": {"name": "hcm", "subFilter": {"name": "router"}}
            }}})
        };
        insert_http_filter(&mut bootstrap, &matcher(8080), json!({"name": "kvmesh"})).unwrap();
        let names = |index: usize| {
            bootstrap["static_resources"]["listeners"][index]["filter_chains"][0]["filters"][0]
                ["typed_config"]["http_filters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(0), ["kvmesh", "router"]);
        assert_eq!(names(1), ["router"]);
        assert!(insert_http_filter(&mut bootstrap, &matcher(9999), json!({})).is_err());
    }

    #[test]
    fn unknown_patches_are_refused() {
        let filter = json!({"spec": {"configPatches": [{"applyTo": "LISTENER", "patch": {"operation": "REMOVE"}}]}});
        let error = apply_envoy_filter(&mut json!({}), &filter, Path::new("x.wasm")).unwrap_err();
        assert!(error.to_string().contains("not emulated"), "{error}");
    }
}
