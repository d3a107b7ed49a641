//! `scripts/bench`'s binary end to end on a tiny fleet: two policies on the
//! multi-tenant workload behind two gateways, with the cache too small for
//! every tenant on every worker, so where a tenant's requests go decides its
//! hit rate; a disaggregated run's remote prefills; and the routers of
//! SGLang and Dynamo, from their own packages, on the same fleet.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use kvmesh_stack::harness::{paths, ManagedProcess};

/// A run takes about 30 s; generous for a loaded CI machine.
const BENCH_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Row {
    policy: String,
    ttft_p90_ms: f64,
    output_tokens_per_s: f64,
    hit_rate: f64,
    request_hit_rate: f64,
    preemptions: u64,
    bound_pooled_lru: f64,
    bound_pooled_free: f64,
    bound_seen_before: f64,
    requests: usize,
    errors: usize,
    workers: usize,
    gateways: usize,
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
                request_hit_rate: number("request_hit_rate"),
                preemptions: fields[column("preemptions")].parse().unwrap(),
                bound_pooled_lru: number("bound_pooled_lru"),
                bound_pooled_free: number("bound_pooled_free"),
                bound_seen_before: number("bound_seen_before"),
                requests: fields[column("requests")].parse().unwrap(),
                errors: fields[column("errors")].parse().unwrap(),
                workers: fields[column("workers")].parse().unwrap(),
                gateways: fields[column("gateways")].parse().unwrap(),
            }
        })
        .collect()
}

#[test]
fn kv_aware_routing_keeps_tenants_cached_where_round_robin_evicts_them() {
    let out = run_bench(&[
        "--gateways=2",
        "--policies=round-robin,precise",
        "--tenant-requests=48",
        // About two tenants' prefixes per worker.
        "--tenant-cache-blocks=170",
    ]);
    let csv = std::fs::read_to_string(out.path().join("multi-tenant.csv")).unwrap();
    let rows = parse_csv(&csv);
    let policies: Vec<&str> = rows.iter().map(|r| r.policy.as_str()).collect();
    assert_eq!(policies, ["round-robin", "precise"], "{csv}");
    for row in &rows {
        assert_eq!(row.requests, 48, "{row:?}");
        assert_eq!((row.workers, row.gateways), (2, 2), "{row:?}");
        assert_eq!(row.errors, 0, "{row:?}");
        assert!(
            row.ttft_p90_ms > 0.0 && row.output_tokens_per_s > 0.0,
            "{row:?}"
        );
        // The engines cannot hit what no earlier prompt computed.
        assert!(
            row.request_hit_rate <= row.bound_seen_before + 0.01,
            "{row:?}"
        );
        // Without preemptions every prompt is admitted once, so the
        // requests' usage reports and the engines' counters agree.
        if row.preemptions == 0 {
            assert!(
                (row.hit_rate - row.request_hit_rate).abs() < 0.02,
                "{row:?}"
            );
        }
        assert!(
            row.bound_pooled_lru <= row.bound_seen_before + 1e-9,
            "{row:?}"
        );
        assert!(row.bound_pooled_lru > 0.5, "{row:?}");
        // Running requests only take room from the pooled cache.
        assert!(
            row.bound_pooled_free <= row.bound_pooled_lru + 1e-9 && row.bound_pooled_free > 0.0,
            "{row:?}"
        );
    }
    let (round_robin, precise) = (&rows[0], &rows[1]);
    assert!(
        precise.request_hit_rate > round_robin.request_hit_rate + 0.15,
        "precise routing should keep tenants cached: {rows:#?}"
    );

    check_per_request_csv(out.path(), &rows);

    let markdown = std::fs::read_to_string(out.path().join("multi-tenant.md")).unwrap();
    for expected in [
        "### Fleet benchmark: multi-tenant, 2 workers, 2 gateways",
        "Envoy round_robin",
        "kvmesh precise",
        "scripts/bench --workers=2 ",
        " --gateways=2 ",
        "Best achievable hit rate",
        "TTFT by prompt length, 2 workers, 2 gateways",
    ] {
        assert!(
            markdown.contains(expected),
            "{expected} missing:\n{markdown}"
        );
    }
    for policy in ["Envoy round_robin", "kvmesh precise"] {
        // TTFT split by prompt length, with each policy's requests counted.
        let row = table_row(&markdown, "TTFT by prompt length", policy);
        assert!(row.contains(" / ") && row.contains('('), "{row}");
        // The client spread each policy's requests evenly over the gateways.
        let row = table_row(
            &markdown,
            "Client pacing and machine load, 2 workers, 2 gateways",
            policy,
        );
        assert!(row.ends_with("| 24 / 24 |"), "{row}");
    }
    for plot in ["multi-tenant-ttft-cdf.svg", "multi-tenant-hit-rate.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("kvmesh precise"),
            "{plot}"
        );
    }
}

/// SGLang's router, from its PyPI package, routes the same fleet in place
/// of Envoy: every request is answered, and its `cache_aware` policy shows
/// in where requests went — each gateway's router keeps every tenant on the
/// worker it first sent that tenant to (its loads never differ by its
/// balancing threshold of 64 requests here), which no Envoy policy does.
#[test]
fn sglang_router_routes_the_same_fleet_by_its_own_prefix_tree() {
    let out = run_bench(&[
        "--gateways=2",
        "--policies=sglang-cache-aware",
        "--tenant-requests=48",
    ]);
    let csv = std::fs::read_to_string(out.path().join("multi-tenant.csv")).unwrap();
    let rows = parse_csv(&csv);
    assert_eq!(rows.len(), 1, "{csv}");
    let row = &rows[0];
    assert_eq!(row.policy, "sglang-cache-aware", "{row:?}");
    assert_eq!((row.requests, row.errors), (48, 0), "{row:?}");
    assert!(row.hit_rate > 0.0, "{row:?}");

    let mut workers_of_tenant: HashMap<(String, String), Vec<String>> = HashMap::new();
    for request in request_rows(out.path()) {
        // No kvmesh filter saw the request.
        assert_eq!(request["routed_cached_blocks"], "", "{request:?}");
        let tenant = (request["gateway"].clone(), request["first_block"].clone());
        workers_of_tenant
            .entry(tenant)
            .or_default()
            .push(request["worker"].clone());
    }
    // 4 tenants through each of 2 gateways.
    assert_eq!(workers_of_tenant.len(), 8, "{workers_of_tenant:?}");
    for ((gateway, tenant), workers) in &workers_of_tenant {
        assert!(
            workers.len() > 1 && workers.iter().all(|w| w == &workers[0]),
            "gateway {gateway} moved tenant {tenant}: {workers:?}"
        );
    }
    let markdown = std::fs::read_to_string(out.path().join("multi-tenant.md")).unwrap();
    assert!(
        markdown.contains("| SGLang router cache_aware |"),
        "{markdown}"
    );
}

/// NVIDIA Dynamo's KV router, from its PyPI package, routes the same fleet
/// from the engines' own KV events, one selector replica per gateway: every
/// request is answered, straight from the worker it booked, and with the
/// cache too small for every tenant on every worker its hit rate is a
/// KV-aware router's, far above round robin's.
#[test]
fn dynamo_kv_router_routes_the_same_fleet_on_the_engines_events() {
    let out = run_bench(&[
        "--gateways=2",
        "--policies=round-robin,dynamo-kv",
        "--tenant-requests=48",
        "--tenant-cache-blocks=170",
    ]);
    let csv = std::fs::read_to_string(out.path().join("multi-tenant.csv")).unwrap();
    let rows = parse_csv(&csv);
    let policies: Vec<&str> = rows.iter().map(|r| r.policy.as_str()).collect();
    assert_eq!(policies, ["round-robin", "dynamo-kv"], "{csv}");
    let (round_robin, dynamo) = (&rows[0], &rows[1]);
    assert_eq!((dynamo.requests, dynamo.errors), (48, 0), "{dynamo:?}");
    assert!(
        dynamo.request_hit_rate > round_robin.request_hit_rate + 0.1,
        "Dynamo's router should keep tenants cached: {rows:#?}"
    );
    let mut answered_by = std::collections::HashSet::new();
    let mut by_replica = [0; 2];
    for request in request_rows(out.path()) {
        if request["policy"] != "dynamo-kv" {
            continue;
        }
        // No kvmesh filter saw the request.
        assert_eq!(request["routed_cached_blocks"], "", "{request:?}");
        answered_by.insert(request["worker"].clone());
        by_replica[request["gateway"].parse::<usize>().unwrap()] += 1;
    }
    assert_eq!(
        answered_by.len(),
        2,
        "one worker took every request: {answered_by:?}"
    );
    assert_eq!(
        by_replica,
        [24, 24],
        "the client alternates the selector replicas"
    );
}

/// Runs `kvmesh-bench` on the multi-tenant workload of 4 tenants of 3
/// users on 2 workers, with `args` added, and returns its output directory.
fn run_bench(args: &[&str]) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let mut command = Command::new(paths::binary("kvmesh-bench").unwrap());
    command
        .current_dir(paths::repo_root())
        .args([
            "--workers=2",
            "--speedup=2",
            "--workloads=multi-tenant",
            "--tenants=4",
            "--tenant-prefix-tokens=1200",
            "--users-per-tenant=3",
            "--question-tokens=30",
            "--tenant-rate=3",
            "--tenant-output-tokens=8",
            "--per-request",
        ])
        .args(args);
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
    out
}

/// A dedicated prefill worker's run reports how many requests it
/// prefilled, and each of those requests names it: the filter's counters
/// agree with the debug headers the client saw.
#[test]
fn a_disaggregated_run_reports_its_remote_prefills() {
    let out = run_bench(&[
        "--gateways=1",
        "--policies=precise-disagg",
        "--dedicated-prefill",
        "--prefill-workers=1",
        "--tenant-requests=24",
    ]);
    let csv = std::fs::read_to_string(out.path().join("multi-tenant.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    let field = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(field("policy"), "precise-disagg");
    assert_eq!(field("errors"), "0", "{csv}");
    let remote: usize = field("remote_prefills").parse().unwrap();
    assert_eq!(field("prefill_failures"), "0", "{csv}");
    // Each tenant's cold first prompt (1,200 tokens) is prefilled remotely.
    assert!(remote >= 4, "{csv}");

    let requests = request_rows(out.path());
    let prefill_workers: Vec<&str> = requests
        .iter()
        .map(|request| request["prefill_worker"].as_str())
        .filter(|worker| !worker.is_empty())
        .collect();
    assert_eq!(prefill_workers.len(), remote, "{requests:?}");
    assert!(
        prefill_workers.iter().all(|w| *w == prefill_workers[0]),
        "one prefill worker: {prefill_workers:?}"
    );
    assert!(prefill_workers[0].starts_with("127.0.0.1:"), "{requests:?}");

    let markdown = std::fs::read_to_string(out.path().join("multi-tenant.md")).unwrap();
    let row = table_row(&markdown, "| policy |", "kvmesh precise + P/D");
    assert!(row.ends_with(&format!("| {remote}/0 |")), "{row}");
}

/// Every request of `multi-tenant-requests.csv` in `out`, by column name.
fn request_rows(out: &std::path::Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(out.join("multi-tenant-requests.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            header
                .iter()
                .map(|h| (*h).to_owned())
                .zip(line.split(',').map(str::to_owned))
                .collect()
        })
        .collect()
}

/// The row of `policy` in the first table after `caption`.
fn table_row<'a>(markdown: &'a str, caption: &str, policy: &str) -> &'a str {
    let (_, table) = markdown
        .split_once(caption)
        .unwrap_or_else(|| panic!("no table {caption}:\n{markdown}"));
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {policy} |")))
        .unwrap_or_else(|| panic!("no row for {policy} after {caption}:\n{table}"))
}

/// Every request has a row naming its gateway, its worker and what the
/// engine found cached (from the stream's usage chunk), and those
/// per-request figures add up to each policy's hit rate in the summary.
/// kvmesh's rows also say what its router saw cached on the chosen worker
/// and on the one holding the most; plain Envoy's leave them empty.
fn check_per_request_csv(out: &std::path::Path, rows: &[Row]) {
    let mut per_policy: HashMap<String, (usize, f64, f64)> = HashMap::new();
    let mut routed_hits = 0;
    for request in request_rows(out) {
        assert!(request["worker"].starts_with("worker-"), "{request:?}");
        assert!(
            ["0", "1"].contains(&request["gateway"].as_str()),
            "{request:?}"
        );
        assert!(
            request["ttft_ms"].parse::<f64>().unwrap() > 0.0,
            "{request:?}"
        );
        let policy = request["policy"].as_str();
        let routed = request["routed_cached_blocks"].as_str();
        let most = request["most_cached_blocks"].as_str();
        if policy == "round-robin" {
            assert_eq!((routed, most), ("", ""), "{request:?}");
        } else {
            let (routed, most): (u64, u64) = (routed.parse().unwrap(), most.parse().unwrap());
            assert!(routed <= most, "{request:?}");
            if most > 0 {
                routed_hits += 1;
            }
        }
        let entry = per_policy.entry(policy.to_owned()).or_default();
        entry.0 += 1;
        entry.1 += request["cached_tokens"].parse::<f64>().unwrap();
        entry.2 += request["prompt_tokens"].parse::<f64>().unwrap();
    }
    // Tenants repeat their system prompts: the router saw most of them.
    assert!(routed_hits > 0, "precise saw no prefix cached anywhere");
    for row in rows {
        let (requests, cached, prompt) = per_policy[&row.policy];
        assert_eq!(requests, row.requests, "{row:?}");
        let rate = cached / prompt;
        assert!(
            (rate - row.request_hit_rate).abs() < 0.005,
            "per-request cached tokens give {rate}, the summary {}",
            row.request_hit_rate
        );
    }
}
