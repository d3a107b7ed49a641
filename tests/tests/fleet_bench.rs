//! `scripts/bench`'s binary end to end on a tiny fleet: two policies on the
//! multi-tenant workload, with the cache too small for every tenant on every
//! worker, so where a tenant's requests go decides its hit rate.

use std::process::Command;
use std::time::{Duration, Instant};

use kvmesh_tests::harness::{paths, ManagedProcess};

/// A run takes about 30 s; generous for a loaded CI machine.
const BENCH_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Row {
    policy: String,
    ttft_p90_ms: f64,
    output_tokens_per_s: f64,
    hit_rate: f64,
    bound_pooled_lru: f64,
    bound_seen_before: f64,
    requests: usize,
    errors: usize,
}

fn parse_csv(text: &str) -> Vec<Row> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let number = |name: &str| fields[column(name)].parse::<f64>().unwrap();
            Row {
                policy: fields[column("policy")].to_owned(),
                ttft_p90_ms: number("ttft_p90_ms"),
                output_tokens_per_s: number("output_tokens_per_s"),
                hit_rate: number("hit_rate"),
                bound_pooled_lru: number("bound_pooled_lru"),
                bound_seen_before: number("bound_seen_before"),
                requests: fields[column("requests")].parse().unwrap(),
                errors: fields[column("errors")].parse().unwrap(),
            }
        })
        .collect()
}

#[test]
fn kv_aware_routing_keeps_tenants_cached_where_round_robin_evicts_them() {
    let out = tempfile::tempdir().unwrap();
    let mut command = Command::new(paths::binary("kvmesh-bench").unwrap());
    command.current_dir(paths::repo_root()).args([
        "--workers=2",
        "--speedup=2",
        "--workloads=multi-tenant",
        "--policies=round-robin,precise",
        "--tenants=4",
        "--tenant-prefix-tokens=1200",
        "--users-per-tenant=3",
        "--question-tokens=30",
        "--tenant-requests=48",
        "--tenant-rate=3",
        "--tenant-output-tokens=8",
        // About two tenants' prefixes per worker.
        "--tenant-cache-blocks=170",
    ]);
    command.arg("--out").arg(out.path());
    let mut bench = ManagedProcess::spawn("kvmesh-bench", command).unwrap();
    let deadline = Instant::now() + BENCH_TIMEOUT;
    let status = loop {
        if let Some(status) = bench.exit_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "kvmesh-bench still running after {BENCH_TIMEOUT:?}:\n{}",
            bench.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "kvmesh-bench failed:\n{}", bench.logs());

    let csv = std::fs::read_to_string(out.path().join("multi-tenant.csv")).unwrap();
    let rows = parse_csv(&csv);
    let policies: Vec<&str> = rows.iter().map(|r| r.policy.as_str()).collect();
    assert_eq!(policies, ["round-robin", "precise"], "{csv}");
    for row in &rows {
        assert_eq!(row.requests, 48, "{row:?}");
        assert_eq!(row.errors, 0, "{row:?}");
        assert!(
            row.ttft_p90_ms > 0.0 && row.output_tokens_per_s > 0.0,
            "{row:?}"
        );
        // The engines cannot hit what no earlier prompt computed.
        assert!(row.hit_rate <= row.bound_seen_before + 0.01, "{row:?}");
        assert!(
            row.bound_pooled_lru <= row.bound_seen_before + 1e-9,
            "{row:?}"
        );
        assert!(row.bound_pooled_lru > 0.5, "{row:?}");
    }
    let (round_robin, precise) = (&rows[0], &rows[1]);
    assert!(
        precise.hit_rate > round_robin.hit_rate + 0.15,
        "precise routing should keep tenants cached: {rows:#?}"
    );

    let markdown = std::fs::read_to_string(out.path().join("multi-tenant.md")).unwrap();
    for expected in [
        "Envoy round_robin",
        "kvmesh precise",
        "scripts/bench --workers=2",
        "Best achievable hit rate",
    ] {
        assert!(
            markdown.contains(expected),
            "{expected} missing:\n{markdown}"
        );
    }
    for plot in ["multi-tenant-ttft-cdf.svg", "multi-tenant-hit-rate.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("kvmesh precise"),
            "{plot}"
        );
    }
}
