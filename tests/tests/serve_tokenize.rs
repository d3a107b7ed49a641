//! `kv-sidecar serve` tokenization with the real Qwen3 tokenizer: ids equal
//! rendering the chat template and tokenizing the whole string, equal what the
//! sim-engine computes, and per-segment ids concatenate to whole-string ids.
//! Also: `check-config` gives one clear error per broken config.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::Duration;

use kv_sidecar::tokenize::{CacheLimits, ModelTokenizer};
use kvmesh_stack::harness::process::{memory_bytes, Memory};
use kvmesh_stack::harness::sidecar::{check_config, Sidecar, SidecarModel};
use kvmesh_stack::harness::sim::SimEngineOptions;
use kvmesh_stack::harness::{free_port, paths, NatsServer, SimEngine};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MODEL: &str = "Qwen/Qwen3-0.6B";
const BLOCK: u32 = 16;

fn entries(entries: usize) -> CacheLimits {
    CacheLimits {
        entries,
        ..CacheLimits::default()
    }
}

fn corpus() -> Vec<Value> {
    let long_system = "You are a careful assistant. ".repeat(40);
    vec![
        json!([{"role": "user", "content": "Hello!"}]),
        json!([{"role": "system", "content": long_system}, {"role": "user", "content": "Summarize KV caching."}]),
        json!([
            {"role": "system", "content": long_system},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And times 3?"}
        ]),
        json!([{"role": "user", "content": "Ünïcødé — 日本語のテキスト 🚀 and tabs\tand\nnewlines"}]),
        json!([{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}]),
        json!([{"role": "user", "content": "literal specials <|im_start|>assistant\n<think>\nhi</think><|im_end|> inside"}]),
        json!([{"role": "user", "content": null}, {"role": "user", "content": "   leading spaces and trailing   "}]),
    ]
}

/// A sidecar serving `MODEL` with `tokenizer_json`.
fn tokenizing_sidecar(nats: &NatsServer, tokenizer_json: &std::path::Path) -> Sidecar {
    Sidecar::start(
        &nats.url(),
        &[SidecarModel {
            name: MODEL.into(),
            block_size: BLOCK,
            tokenizer: Some(tokenizer_json.to_owned()),
        }],
        "",
    )
    .expect("sidecar starts")
}

fn tokenize(client: &reqwest::blocking::Client, sidecar: &Sidecar, body: Value) -> Value {
    let response = client
        .post(format!("{}/v1/tokenize", sidecar.http_url()))
        .json(&body)
        .send()
        .expect("tokenize request");
    assert!(
        response.status().is_success(),
        "tokenize: {}",
        response.status()
    );
    response.json().expect("tokenize JSON")
}

fn block_hashes(response: &Value) -> Vec<u64> {
    response["block_hashes"]
        .as_array()
        .expect("block_hashes")
        .iter()
        .map(|h| h.as_u64().expect("u64 hash"))
        .collect()
}

fn ids_of(response: &Value) -> Vec<u32> {
    response["token_ids_by_segment"]
        .as_array()
        .expect("segments")
        .iter()
        .flat_map(|s| {
            s.as_array()
                .expect("segment")
                .iter()
                .map(|t| t.as_u64().expect("id") as u32)
        })
        .collect()
}

#[test]
fn tokenize_service_matches_template_whole_string_and_sim_engine() {
    let dir = paths::qwen3_tokenizer_dir().expect("Qwen3 tokenizer present");
    let tokenizer_json = dir.join("tokenizer.json");
    let nats = NatsServer::start().expect("nats-server starts");
    let sidecar = tokenizing_sidecar(&nats, &tokenizer_json);
    let sim = SimEngine::start(
        SimEngineOptions::new(MODEL, "w0")
            .tokenizer(tokenizer_json.clone())
            .args(["--block-size", "16", "--speedup", "200"]),
    )
    .expect("sim-engine starts");
    let reference = ModelTokenizer::load(MODEL, &tokenizer_json, None, BLOCK, entries(16))
        .expect("tokenizer loads");
    let client = reqwest::blocking::Client::new();

    for messages in corpus() {
        let response = tokenize(
            &client,
            &sidecar,
            json!({"model": MODEL, "messages": messages}),
        );
        let ids = ids_of(&response);
        let rendered = reference
            .render(messages.as_array().unwrap(), None, None)
            .unwrap();
        assert_eq!(
            ids,
            reference.encode_whole(&rendered).unwrap(),
            "whole-string ids for {messages}"
        );
        assert_eq!(response["num_tokens"].as_u64(), Some(ids.len() as u64));

        let completion: Value = client
            .post(format!("{}/v1/chat/completions", sim.url()))
            .json(&json!({"model": MODEL, "messages": messages, "max_tokens": 2}))
            .timeout(Duration::from_secs(20))
            .send()
            .and_then(|r| r.json())
            .expect("sim chat completion");
        assert_eq!(
            completion["usage"]["prompt_tokens"].as_u64(),
            Some(ids.len() as u64),
            "sim-engine token count for {messages}"
        );
        // The sim caches the prompt's full blocks under the same kvmesh hashes.
        let cache: Value = reqwest::blocking::get(format!("{}/sim/cache", sim.url()))
            .and_then(|r| r.json())
            .expect("/sim/cache");
        let cached: HashSet<u64> = cache["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["seq_hash"].as_u64())
            .collect();
        let hashes = block_hashes(&response);
        assert_eq!(hashes.len(), ids.len() / BLOCK as usize);
        // `history_blocks` leading blocks are what the next turn starts with;
        // only the generation prompt's block may differ.
        let history = response["history_blocks"].as_u64().expect("history_blocks") as usize;
        assert!(
            history <= hashes.len() && history + 1 >= hashes.len(),
            "{history} of {}",
            hashes.len()
        );
        let mut next_turn = messages.as_array().unwrap().clone();
        next_turn.push(json!({"role": "assistant", "content": "Sure."}));
        next_turn.push(json!({"role": "user", "content": "Go on."}));
        let next = tokenize(
            &client,
            &sidecar,
            json!({"model": MODEL, "messages": next_turn}),
        );
        let next_hashes = block_hashes(&next);
        assert_eq!(
            next_hashes.get(..history),
            Some(&hashes[..history]),
            "the next turn of {messages} starts with its history blocks"
        );
        assert!(
            hashes.iter().all(|h| cached.contains(h)),
            "sim caches every prompt block of {messages}"
        );
    }

    // A text prompt, and the repeated system prompt was served from the cache.
    let prompt = tokenize(
        &client,
        &sidecar,
        json!({"model": MODEL, "prompt": "plain text prompt"}),
    );
    assert_eq!(
        ids_of(&prompt),
        reference.encode_whole("plain text prompt").unwrap()
    );
    assert!(sidecar.metric("kvmesh_serve_tokenize_cache_hits_total", "") >= 1.0);

    // A cache salt keeps the ids and re-keys every block from the salt's root.
    let messages = &corpus()[1];
    let plain = tokenize(
        &client,
        &sidecar,
        json!({"model": MODEL, "messages": messages}),
    );
    let salted = tokenize(
        &client,
        &sidecar,
        json!({"model": MODEL, "messages": messages, "cache_salt": "tenant-a"}),
    );
    assert_eq!(ids_of(&salted), ids_of(&plain));
    let hasher = reference.hasher();
    let expected: Vec<u64> = hasher
        .sequence_hashes_after(Some(hasher.salt_root("tenant-a")), &ids_of(&plain))
        .into_iter()
        .map(|h| h.0)
        .collect();
    assert_eq!(block_hashes(&salted), expected);
    let plain_hashes: HashSet<u64> = block_hashes(&plain).into_iter().collect();
    assert!(!expected.is_empty() && expected.iter().all(|h| !plain_hashes.contains(h)));
    let unknown = client
        .post(format!("{}/v1/tokenize", sidecar.http_url()))
        .json(&json!({"model": "nope", "prompt": "x"}))
        .send()
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);

    // /debug/route explains a decision with the same hashes.
    let route: Value = client
        .post(format!("{}/debug/route", sidecar.http_url()))
        .json(&json!({"model": MODEL, "messages": corpus()[1]}))
        .send()
        .and_then(|r| r.json())
        .expect("/debug/route");
    let expected = tokenize(
        &client,
        &sidecar,
        json!({"model": MODEL, "messages": corpus()[1]}),
    );
    assert_eq!(route["block_hashes"], expected["block_hashes"]);
    assert!(route["workers"].is_array(), "{route}");
}

#[test]
fn per_segment_ids_concatenate_to_whole_string_ids() {
    let dir = paths::qwen3_tokenizer_dir().expect("Qwen3 tokenizer present");
    let tokenizer =
        ModelTokenizer::load(MODEL, &dir.join("tokenizer.json"), None, BLOCK, entries(64))
            .expect("tokenizer loads");
    let pieces = [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "<|im_",
        "|>",
        "<",
        ">",
        "user",
        "assistant",
        "\n",
        "\n\n",
        " ",
        "  ",
        "\t",
        "hello",
        " world",
        "ünï",
        "日本語",
        "🚀",
        "123",
        "4567",
        "don't",
        "'s",
        "!!",
        "a",
        "<|vision_start|>",
        "<|fim_prefix|>",
    ];
    let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    for case in 0..400 {
        let text: String = (0..rng.random_range(0..40))
            .map(|_| pieces[rng.random_range(0..pieces.len())])
            .collect();
        let segmented = tokenizer.tokenize_text(&text).unwrap().token_ids();
        assert_eq!(
            segmented,
            tokenizer.encode_whole(&text).unwrap(),
            "case {case}: {text:?}"
        );
    }
}

/// A `chat_template` override is read from the file named, whatever its name
/// (it used to be read from a `tokenizer_config.json` beside it).
#[test]
fn a_chat_template_override_of_any_name_is_the_one_rendered() {
    let dir = paths::qwen3_tokenizer_dir().expect("Qwen3 tokenizer present");
    let overrides = tempfile::tempdir().unwrap();
    let template = overrides.path().join("override-template.json");
    std::fs::write(
        &template,
        json!({"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"})
            .to_string(),
    )
    .unwrap();
    let tokenizer = ModelTokenizer::load(
        MODEL,
        &dir.join("tokenizer.json"),
        Some(&template),
        BLOCK,
        entries(64),
    )
    .expect("tokenizer loads");
    let messages = [json!({"role": "user", "content": "hello"})];
    assert_eq!(
        tokenizer.render(&messages, None, None).unwrap(),
        "[user] hello\n"
    );
    assert_eq!(
        tokenizer
            .tokenize_chat(&messages, None, None)
            .unwrap()
            .token_ids(),
        tokenizer.encode_whole("[user] hello\n").unwrap()
    );

    // A bare Jinja template, as newer models ship `chat_template.jinja`.
    let jinja = overrides.path().join("chat_template.jinja");
    std::fs::write(
        &jinja,
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tokenizer = ModelTokenizer::load(
        MODEL,
        &dir.join("tokenizer.json"),
        Some(&jinja),
        BLOCK,
        entries(64),
    )
    .expect("tokenizer loads");
    assert_eq!(
        tokenizer.render(&messages, None, None).unwrap(),
        "<user>hello"
    );

    // A named file that is missing or holds no template is an error, not
    // the tokenizer's template or the fallback.
    std::fs::write(&template, "{}").unwrap();
    for path in [template.clone(), overrides.path().join("missing.json")] {
        let error = ModelTokenizer::load(
            MODEL,
            &dir.join("tokenizer.json"),
            Some(&path),
            BLOCK,
            entries(64),
        )
        .err()
        .expect("an unusable override is refused");
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
    }
}

#[test]
fn check_config_reports_one_clear_error_per_problem() {
    // check-config never connects, but ports still come from the kernel.
    let (nats_port, http_port, grpc_port) = (free_port(), free_port(), free_port());
    let nats = format!("nats: {{url: 'nats://127.0.0.1:{nats_port}'}}");
    let good = format!(
        "{nats}\nlisten: {{http: '127.0.0.1:{http_port}', grpc: '127.0.0.1:{grpc_port}'}}\n\
         models:\n  - {{name: m, block_size: 16, temperature: 0}}\n"
    );
    let with_auth = format!(
        "nats: {{url: 'nats://127.0.0.1:{nats_port}', auth: {{token: t, user: u, password: p}}}}"
    );
    let (ok, out) = check_config(&good).unwrap();
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "OK");
    let tokenizer = paths::qwen3_tokenizer_dir()
        .expect("Qwen3 tokenizer present")
        .join("tokenizer.json")
        .display()
        .to_string();
    let templates = tempfile::tempdir().unwrap();
    let no_template = templates.path().join("template.json");
    std::fs::write(&no_template, r#"{"bos_token": "<s>"}"#).unwrap();
    let with_template = templates.path().join("custom.json");
    std::fs::write(&with_template, r#"{"chat_template": "{{ messages }}"}"#).unwrap();
    let (ok, out) = check_config(&good.replace(
        "temperature: 0}",
        &format!(
            "temperature: 0, tokenizer: {tokenizer}, chat_template: {}}}",
            with_template.display()
        ),
    ))
    .unwrap();
    assert!(ok, "a template file of any name: {out}");
    let cases = [
        (
            good.replace("block_size: 16", "block_size: 5000"),
            "models[0].block_size: 5000 exceeds the maximum of 4096",
        ),
        (
            good.replace(
                "temperature: 0}",
                "temperature: 0, disaggregation: {policy: sometimes}}",
            ),
            "unknown variant `sometimes`",
        ),
        (
            good.replace("temperature:", "temperatur:"),
            "unknown field `temperatur`",
        ),
        (
            good.replace("nats://", "http://"),
            "nats.url: must start with nats://",
        ),
        (
            good.replace(&grpc_port.to_string(), &http_port.to_string()),
            "listen.grpc: must differ from listen.http",
        ),
        (
            good.replace("temperature: 0}", "temperature: -1}"),
            "models[0].temperature: must be a finite number >= 0",
        ),
        (
            good.replace(
                "temperature: 0}",
                "temperature: 0, tokenizer: /nonexistent/tokenizer.json}",
            ),
            "models[0].tokenizer: file does not exist",
        ),
        (
            good.replace(
                "models:\n  - {name: m, block_size: 16, temperature: 0}\n",
                "models: []\n",
            ),
            "models: must list at least one model",
        ),
        (
            good.replace(&nats, &with_auth),
            "nats.auth: set exactly one of",
        ),
        (
            good.replace(
                "temperature: 0}",
                &format!(
                    "temperature: 0, tokenizer: {tokenizer}, chat_template: {}}}",
                    no_template.display()
                ),
            ),
            "models[0].chat_template: reading",
        ),
    ];
    for (yaml, expected) in cases {
        let (ok, out) = check_config(&yaml).unwrap();
        assert!(!ok, "accepted: {yaml}");
        assert!(out.contains(expected), "expected {expected:?}, got {out:?}");
        assert_eq!(out.trim().lines().count(), 1, "one error: {out}");
    }
}

/// The most memory a process ever held resident.
fn peak_rss(pid: u32) -> u64 {
    memory_bytes(pid, Memory::PeakResident).unwrap()
}

/// Tokenizing takes ~300 bytes of memory per byte of prompt (the
/// tokenizer's pre-tokens and encoding: +1 GB for one 3.5 MiB chat), so the
/// sidecar tokenizes at most `tokenize.max_inflight_bytes` (4 MiB) of bodies
/// at once: of a burst of such chats, those past it get a 503 at once (the
/// filter then routes approximately), and the sidecar's memory stays within
/// what one of them takes.
#[test]
fn a_burst_of_huge_prompts_is_tokenized_within_the_memory_budget() {
    let dir = paths::qwen3_tokenizer_dir().expect("Qwen3 tokenizer present");
    let nats = NatsServer::start().expect("nats-server starts");
    let mut sidecar = tokenizing_sidecar(&nats, &dir.join("tokenizer.json"));
    let pid = sidecar.process().pid();
    let client = reqwest::blocking::Client::new();
    let url = format!("{}/v1/tokenize", sidecar.http_url());
    let chat = |words: usize, seed: usize| {
        let text: Vec<String> = (0..words)
            .map(|i| format!("w{:x}", (i * 7_919 + seed) % 50_000))
            .collect();
        serde_json::to_vec(&json!({"model": MODEL,
            "messages": [{"role": "user", "content": text.join(" ")}]}))
        .unwrap()
    };
    // One alone first: what a single huge prompt costs.
    let warm = client
        .post(&url)
        .header("content-type", "application/json")
        .body(chat(10_000, 0))
        .send()
        .unwrap();
    assert_eq!(warm.status(), 200);
    let before = peak_rss(pid);
    let one = chat(620_000, 1);
    assert!(one.len() > 3 << 20 && one.len() < 4 << 20, "{}", one.len());
    let alone = client
        .post(&url)
        .header("content-type", "application/json")
        .body(one.clone())
        .timeout(Duration::from_secs(120))
        .send()
        .unwrap();
    assert_eq!(alone.status(), 200);
    let single = peak_rss(pid).saturating_sub(before);

    let burst = 8;
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let sends: Vec<_> = (0..burst)
            .map(|seed| {
                let (client, url) = (&client, &url);
                let body = chat(620_000, seed + 2);
                scope.spawn(move || {
                    client
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body)
                        .timeout(Duration::from_secs(300))
                        .send()
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        sends.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let peak = peak_rss(pid).saturating_sub(before);
    println!(
        "one {} MiB prompt: +{} MiB; a burst of {burst}: {statuses:?}, +{} MiB",
        one.len() >> 20,
        single >> 20,
        peak >> 20
    );
    assert!(
        statuses.iter().all(|s| [200, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    // One at a time fits the default budget (4 MiB); the previous 16 MiB
    // let four run at once: +3,570 MiB.
    assert!(
        peak <= single + single / 2,
        "+{} MiB for the burst against +{} MiB for one",
        peak >> 20,
        single >> 20
    );
}
