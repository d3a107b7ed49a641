//! `scripts/quickstart`'s binary: prints its components, serves requests,
//! restarts crashed children while the gateway keeps serving, and leaves no
//! process behind on SIGTERM.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_stack::harness::client::{http_client, post_json, prometheus_sum};
use kvmesh_stack::harness::{paths, readiness, ManagedProcess};
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
    let (quickstart, lines) = start(&["--workers", "2", "--speedup", "10"], &TWO_WORKER_LINES);
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

/// How long a crashed child may take to be reported, restarted and ready.
/// What a two-worker quickstart prints, in order.
const TWO_WORKER_LINES: [&str; 6] = [
    "gateway",
    "nats",
    "sidecar",
    "worker",
    "worker",
    "envoy-admin",
];

const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory of the quickstart's `logs:` line.
fn log_dir(quickstart: &mut ManagedProcess) -> PathBuf {
    let log = quickstart.log_path().to_owned();
    let find = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("logs: ").map(PathBuf::from))
    };
    readiness::wait_until(
        quickstart,
        "printing logs:",
        Duration::from_secs(10),
        || find().is_some(),
    )
    .unwrap();
    find().unwrap()
}

/// The pid the quickstart's `pids` file lists for `name`.
fn pid_of(logs: &Path, name: &str) -> Option<libc::pid_t> {
    std::fs::read_to_string(logs.join("pids"))
        .ok()?
        .lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, pid)| pid.parse().ok())
}

/// SIGKILLs the child `name` and waits until the quickstart has reported
/// the exit and the restart, lists a new pid for it, and `ready` holds.
fn crash_and_await_restart(
    quickstart: &mut ManagedProcess,
    logs: &Path,
    name: &str,
    ready: impl Fn() -> bool,
) {
    let old = pid_of(logs, name).unwrap_or_else(|| panic!("no pid of {name}"));
    // SAFETY: plain syscall on a child the quickstart started.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0, "kill {name}");
    let exited = format!("quickstart: {name} exited (signal: 9 (SIGKILL)); restarting in 250ms");
    let restarted = format!("quickstart: {name} restarted (pid ");
    let log = quickstart.log_path().to_owned();
    readiness::wait_until(
        quickstart,
        &format!("restarting {name}"),
        RECOVERY_TIMEOUT,
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains(&exited)
                && text.contains(&restarted)
                && pid_of(logs, name).is_some_and(|pid| pid != old)
                && ready()
        },
    )
    .unwrap();
    // The crashed run's log is kept beside the new one.
    let kept = logs.join(format!("{name}.log.1"));
    assert!(
        file_has_text(&kept),
        "{} is missing or empty",
        kept.display()
    );
}

fn file_has_text(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0)
}

/// Chat requests sent back to back to `gateway` until stopped: the status
/// of each (0 when no response came).
struct GatewayLoad {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u16>>,
}

impl GatewayLoad {
    fn start(gateway: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{gateway}/v1/chat/completions");
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let client = http_client();
                let mut statuses = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let chat = json!({
                        "model": "qwen3",
                        "messages": [{"role": "user", "content": format!("Are you still there? {i}")}],
                        "max_tokens": 2
                    });
                    let status = post_json(&client, &url, &chat).map_or(0, |r| r.status);
                    statuses.push(status);
                    std::thread::sleep(Duration::from_millis(20));
                }
                statuses
            }
        });
        Self { stop, thread }
    }

    fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Sum of the blocks the sidecar indexes over all workers, and how many
/// workers it knows.
fn sidecar_view(sidecar: &str) -> (u64, usize) {
    let Ok(body) = reqwest::blocking::get(format!("{sidecar}/v1/workers"))
        .and_then(|r| r.json::<serde_json::Value>())
    else {
        return (0, 0);
    };
    let workers = body["workers"].as_array().cloned().unwrap_or_default();
    let blocks = workers.iter().filter_map(|w| w["blocks"].as_u64()).sum();
    (blocks, workers.len())
}

/// A completion of fresh blocks through the gateway reaches the sidecar's
/// index: engine → relay → NATS → sidecar works end to end.
fn assert_events_flow(gateway: &str, sidecar: &str, first_token: u32) {
    let (before, _) = sidecar_view(sidecar);
    let prompt: Vec<u32> = (first_token..first_token + 64).collect();
    let body = json!({"model": "qwen3", "prompt": prompt, "max_tokens": 2});
    let response = post_json(&http_client(), &format!("{gateway}/v1/completions"), &body).unwrap();
    assert_eq!(response.status, 200, "{}", response.text);
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    while sidecar_view(sidecar).0 < before + 4 {
        assert!(
            Instant::now() < deadline,
            "the sidecar never indexed the 4 new blocks (still {:?})",
            sidecar_view(sidecar)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn quickstart_restarts_crashed_children_while_the_gateway_keeps_serving() {
    let (mut quickstart, lines) = start(&["--workers", "2", "--speedup", "10"], &TWO_WORKER_LINES);
    let (gateway, nats, sidecar, worker) = (&lines[0].1, &lines[1].1, &lines[2].1, &lines[3].1);
    let logs = log_dir(&mut quickstart);
    for name in [
        "nats-server",
        "kv-sidecar-serve",
        "sim-engine-worker-0",
        "relay-worker-1",
        "envoy",
    ] {
        let log = logs.join(format!("{name}.log"));
        assert!(file_has_text(&log), "{} is missing or empty", log.display());
    }

    let load = GatewayLoad::start(gateway);
    let client = reqwest::blocking::Client::new();
    crash_and_await_restart(&mut quickstart, &logs, "kv-sidecar-serve", || {
        readiness::http_ok(&client, &format!("{sidecar}/readyz")) && sidecar_view(sidecar).1 == 2
    });
    assert_events_flow(gateway, sidecar, 10_000);
    let nats_address = nats.trim_start_matches("nats://");
    crash_and_await_restart(&mut quickstart, &logs, "nats-server", || {
        readiness::tcp_open(nats_address)
    });
    // The relays and the sidecar reconnect to the new server by themselves.
    assert_events_flow(gateway, sidecar, 20_000);
    let statuses = load.finish();
    assert!(
        statuses.len() >= 20,
        "only {} requests sent",
        statuses.len()
    );
    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} gateway requests failed: {failed:?}",
        failed.len(),
        statuses.len()
    );

    crash_and_await_restart(&mut quickstart, &logs, "sim-engine-worker-0", || {
        readiness::http_ok(&client, &format!("{worker}/health"))
    });
    let completion = json!({"model": "qwen3", "prompt": [1, 2, 3], "max_tokens": 2});
    let response = post_json(&client, &format!("{worker}/v1/completions"), &completion).unwrap();
    assert_eq!(response.status, 200, "{}", response.text);

    // Envoy comes back on the same ports (the one crash that interrupts the
    // gateway).
    let chat =
        json!({"model": "qwen3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let url = format!("{gateway}/v1/chat/completions");
    crash_and_await_restart(&mut quickstart, &logs, "envoy", || {
        post_json(&client, &url, &chat).is_ok_and(|r| r.status == 200)
    });

    stop(quickstart, &lines);
    assert!(!logs.exists(), "{} outlived the quickstart", logs.display());
}
