//! `scripts/quickstart --engine vllm --workers 2`'s binary: real vLLM
//! workers behind the gateway, the usual component lines, a chat request and
//! a repeated prefix served from cache, nothing left on SIGTERM. Needs
//! `scripts/setup --with-vllm`; `KVMESH_SKIP_VLLM=<reason>` skips it.

use std::process::Command;
use std::time::{Duration, Instant};

use kvmesh_stack::harness::client::{http_client, post_json};
use kvmesh_stack::harness::{paths, readiness, ManagedProcess};
use serde_json::json;

/// Two engines loading at once on a shared 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(300);

fn component_lines(logs: &str) -> Vec<(String, String)> {
    logs.lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(_, url)| url.contains("://"))
        .map(|(name, url)| (name.to_owned(), url.to_owned()))
        .collect()
}

#[test]
fn quickstart_runs_real_vllm_workers_behind_the_gateway() {
    if kvmesh_stack::harness::vllm::skipped("the real-vLLM quickstart test") {
        return;
    }
    let mut command = Command::new(paths::binary("kvmesh-quickstart").unwrap());
    command.args(["--engine", "vllm", "--workers", "2"]);
    let mut quickstart = ManagedProcess::spawn("quickstart", command).unwrap();
    let log = quickstart.log_path().to_owned();
    readiness::wait_until(&mut quickstart, "printing logs:", START_TIMEOUT, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("\nlogs: ")
    })
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
    let chat = json!({"model": "qwen3", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hello"}]});
    let response = post_json(&client, &format!("{gateway}/v1/chat/completions"), &chat).unwrap();
    assert_eq!(response.status, 200, "{}", response.text);

    let prefix = (0..150)
        .map(|i| format!("quick{}", i * 31 % 997))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cached = 0;
    for question in ["one", "two"] {
        let body = json!({"model": "qwen3", "max_tokens": 2,
            "prompt": format!("{prefix} question {question}?")});
        let response = post_json(&client, &format!("{gateway}/v1/completions"), &body).unwrap();
        assert_eq!(response.status, 200, "{}", response.text);
        cached = response.cached_tokens();
        // Let the first request's KV events reach the gateway.
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(cached >= 512, "second request found {cached} tokens cached");

    quickstart.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while quickstart.exit_status().is_none() {
        assert!(Instant::now() < deadline, "quickstart ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    for (name, url) in &lines[3..5] {
        let address = url.trim_start_matches("http://");
        assert!(!readiness::tcp_open(address), "{name} {url} still listens");
    }
}
