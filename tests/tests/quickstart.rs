//! `scripts/quickstart`'s binary: prints its components, serves requests, and
//! leaves no process behind on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use kvmesh_tests::harness::client::{http_client, post_json};
use kvmesh_tests::harness::{paths, readiness, ManagedProcess};
use serde_json::json;

fn component_lines(logs: &str) -> Vec<(String, String)> {
    logs.lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, url)| {
            ["gateway", "nats", "sidecar", "worker", "envoy-admin"].contains(name)
                && url.contains("://")
        })
        .map(|(name, url)| (name.to_owned(), url.to_owned()))
        .collect()
}

#[test]
fn quickstart_serves_requests_and_stops_every_child() {
    let mut command = Command::new(paths::binary("kvmesh-quickstart").unwrap());
    command.args(["--workers", "2", "--speedup", "10"]);
    let mut quickstart = ManagedProcess::spawn("quickstart", command).unwrap();
    let log = quickstart.log_path().to_owned();
    readiness::wait_until(
        &mut quickstart,
        "printing envoy-admin",
        Duration::from_secs(90),
        || component_lines(&std::fs::read_to_string(&log).unwrap_or_default()).len() >= 6,
    )
    .unwrap();
    let lines = component_lines(&quickstart.logs());
    let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "gateway",
            "nats",
            "sidecar",
            "worker",
            "worker",
            "envoy-admin"
        ],
        "{}",
        quickstart.logs()
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
    let admin = &lines[lines.len() - 1].1;
    let stats = reqwest::blocking::get(format!("{admin}/stats?filter=kvmesh_requests_precise"))
        .unwrap()
        .text()
        .unwrap();
    let precise: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("wasmcustom.kvmesh_requests_precise: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert_eq!(precise, 2, "{stats}");

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
    for (name, url) in &lines {
        let address = url.split("://").nth(1).unwrap();
        assert!(
            !readiness::tcp_open(address),
            "{name} at {url} still accepts connections after quickstart stopped"
        );
    }
}
