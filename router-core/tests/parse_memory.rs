//! Parsing an untrusted body allocates at most twice the body, whatever its
//! shape: the filter's wasm VM keeps the high-water mark of its linear memory
//! for good, so a shape that costs 80× its size (as a generic JSON tree does)
//! would pin hundreds of MB per VM.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use router_core::request::{parse_request, Endpoint};

/// Counts live bytes and their peak since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// One measurement at a time: the counters are process-wide.
static MEASURING: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const BODY_BYTES: usize = 8 << 20;

/// `head`, then `item` repeated (comma-separated) to about 8 MiB, then `tail`.
fn body(head: &str, item: &str, tail: &str) -> Vec<u8> {
    let count = (BODY_BYTES - head.len() - tail.len()) / (item.len() + 1);
    let mut body = Vec::with_capacity(BODY_BYTES);
    body.extend_from_slice(head.as_bytes());
    for i in 0..count {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item.as_bytes());
    }
    body.extend_from_slice(tail.as_bytes());
    body
}

/// Peak bytes allocated while parsing `body` for `endpoint`.
fn parse_peak(endpoint: Endpoint, body: &[u8]) -> (usize, bool) {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let ok = parse_request(endpoint, body, usize::MAX).is_ok();
    (PEAK.load(Ordering::Relaxed) - before, ok)
}

#[test]
fn adversarial_shapes_cost_at_most_twice_the_body() {
    let deep = format!("{}0{}", r#"{"a":"#.repeat(120), "}".repeat(120));
    let cases: Vec<(&str, Endpoint, Vec<u8>, bool)> = vec![
        (
            "tiny objects in an ignored field",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":"p","x":["#, r#"{"":0}"#, "]}"),
            true,
        ),
        (
            "tiny objects as the prompt",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":["#, r#"{"":0}"#, "]}"),
            false,
        ),
        (
            "single-digit token ids past the cap",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":["#, "1", "]}"),
            false,
        ),
        (
            "eight-digit token ids",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":["#, "15164300", "]}"),
            true,
        ),
        (
            "a batch of one-token prompts",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":["#, "[1]", "]}"),
            true,
        ),
        (
            "a batch of one-letter prompts",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":["#, r#""a""#, "]}"),
            true,
        ),
        (
            "a batch whose first prompt is huge",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":[["#, "70000000", "],[1]]}"),
            true,
        ),
        (
            "one long text",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":""#, "ab", r#""}"#),
            true,
        ),
        (
            "role-only messages",
            Endpoint::ChatCompletions,
            body(r#"{"model":"m","messages":["#, r#"{"role":"a"}"#, "]}"),
            false,
        ),
        (
            "image parts",
            Endpoint::ChatCompletions,
            body(
                r#"{"model":"m","messages":[{"role":"user","content":["#,
                r#"{"type":"image_url","image_url":{"url":"x"}}"#,
                "]}]}",
            ),
            false,
        ),
        (
            "one-letter text parts",
            Endpoint::ChatCompletions,
            body(
                r#"{"model":"m","messages":[{"role":"user","content":["#,
                r#"{"type":"text","text":"a"}"#,
                "]}]}",
            ),
            false,
        ),
        (
            "messages with tool calls",
            Endpoint::ChatCompletions,
            body(
                r#"{"model":"m","messages":["#,
                r#"{"role":"assistant","content":null,"tool_calls":[{"id":"1","function":{"arguments":"{}"}}]}"#,
                "]}",
            ),
            false,
        ),
        (
            "120-deep objects in an ignored field",
            Endpoint::Completions,
            body(r#"{"model":"m","prompt":"p","x":["#, &deep, "]}"),
            true,
        ),
        (
            "120-deep objects as message content",
            Endpoint::ChatCompletions,
            body(
                r#"{"model":"m","messages":[{"role":"user","content":["#,
                &deep,
                "]}]}",
            ),
            false,
        ),
    ];
    for (name, endpoint, body, parses) in cases {
        let (peak, ok) = parse_peak(endpoint, &body);
        assert_eq!(ok, parses, "{name}");
        let bound = 2 * body.len() + 64 * 1024;
        assert!(
            peak <= bound,
            "{name}: parsing {} bytes allocated {peak} bytes at peak",
            body.len()
        );
        println!("{name}: {} bytes, peak {peak} bytes", body.len());
    }
}
