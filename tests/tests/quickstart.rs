//! `scripts/quickstart`'s binary: prints its components, serves requests, and
//! leaves no process behind on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use kvmesh_tests::harness::client::{http_client, post_json, prometheus_sum};
use kvmesh_tests::harness::{paths, readiness, ManagedProcess};
use serde_json::json;

fn component_lines(logs: &str) -> Vec<(String, String)> {
    logs.lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, url)| {
            [
                "gateway",
                "nats",
                "sidecar",
                "worker",
                "prefill-worker",
                "envoy-admin",
            ]
            .contains(name)
                && url.contains("://")
        })
        .map(|(name, url)| (name.to_owned(), url.to_owned()))
        .collect()
}

/// Starts the quickstart with `args` and waits for its `expected` lines.
fn start(args: &[&str], expected: &[&str]) -> (ManagedProcess, Vec<(String, String)>) {
    let mut command = Command::new(paths::binary("kvmesh-quickstart").unwrap());
    command.args(args);
    let mut quickstart = ManagedProcess::spawn("quickstart", command).unwrap();
    let log = quickstart.log_path().to_owned();
    readiness::wait_until(
        &mut quickstart,
        "printing envoy-admin",
        Duration::from_secs(90),
        || {
            component_lines(&std::fs::read_to_string(&log).unwrap_or_default()).len()
                >= expected.len()
        },
    )
    .unwrap();
    let lines = component_lines(&quickstart.logs());
    let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, expected, "{}", quickstart.logs());
    (quickstart, lines)
}

/// A filter counter from the gateway's Envoy admin (the last line).
fn filter_counter(lines: &[(String, String)], name: &str) -> u64 {
    let admin = &lines[lines.len() - 1].1;
    let stats = reqwest::blocking::get(format!("{admin}/stats?filter={name}"))
        .unwrap()
        .text()
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("wasmcustom.{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// SIGTERM stops the quickstart and every component it printed.
fn stop(mut quickstart: ManagedProcess, lines: &[(String, String)]) {
    quickstart.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = quickstart.exit_status() {
            break status;
        }
        assert!(Instant::now() < deadline, "quickstart ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "quickstart exited with {status}");
    for (name, url) in lines {
        let address = url.split("://").nth(1).unwrap();
        assert!(
            !readiness::tcp_open(address),
            "{name} at {url} still accepts connections after quickstart stopped"
        );
    }
}

#[test]
fn quickstart_serves_requests_and_stops_every_child() {
    let (quickstart, lines) = start(
        &["--workers", "2", "--speedup", "10"],
        &[
            "gateway",
            "nats",
            "sidecar",
            "worker",
            "worker",
            "envoy-admin",
        ],
    );
    let gateway = &lines[0].1;
    let client = http_client();
    let chat = json!({
        "model": "qwen3",
        "messages": [{"role": "user", "content": "Hello from the quickstart test"}],
        "max_tokens": 4
    });
    let response = post_json(&client, &format!("{gateway}/v1/chat/completions"), &chat).unwrap();
    assert_eq!(response.status, 200, "{}", response.text);
    let body = response.json().unwrap();
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
    let tokens: Vec<u32> = (0..64).collect();
    let completion = json!({"model": "qwen3", "prompt": tokens, "max_tokens": 2});
    let response = post_json(&client, &format!("{gateway}/v1/completions"), &completion).unwrap();
    assert_eq!(response.status, 200, "{}", response.text);
    // The gateway routes with fleet state from the sidecar, not by fallback.
    assert_eq!(filter_counter(&lines, "kvmesh_requests_precise"), 2);
    stop(quickstart, &lines);
}

#[test]
fn quickstart_disaggregates_long_prompts_and_keeps_short_ones_local() {
    let (quickstart, lines) = start(
        &[
            "--workers",
            "1",
            "--prefill-workers",
            "1",
            "--speedup",
            "10",
        ],
        &[
            "gateway",
            "nats",
            "sidecar",
            "worker",
            "prefill-worker",
            "envoy-admin",
        ],
    );
    let (gateway, prefill) = (&lines[0].1, &lines[4].1);
    let client = http_client();
    let blocks_sent = || {
        prometheus_sum(
            &format!("{prefill}/metrics"),
            "sim:kv_transfer_blocks_sent_total",
            "",
        )
    };
    let send = |tokens: u32| {
        let prompt: Vec<u32> = (0..tokens).map(|t| 500 + t).collect();
        let body = json!({"model": "qwen3", "prompt": prompt, "max_tokens": 2});
        let response = post_json(&client, &format!("{gateway}/v1/completions"), &body).unwrap();
        assert_eq!(response.status, 200, "{}", response.text);
    };
    // Under `auto`, 256 uncached tokens are below the 1,024-token threshold.
    send(256);
    assert_eq!(filter_counter(&lines, "kvmesh_remote_prefills"), 0);
    assert_eq!(blocks_sent(), 0.0);
    send(2_048);
    assert_eq!(filter_counter(&lines, "kvmesh_remote_prefills"), 1);
    assert_eq!(blocks_sent(), 128.0);
    stop(quickstart, &lines);
}
