//! Untrusted request bodies through the filter's parser and rewriter: never a
//! panic, and a request the router accepts keeps its meaning when its
//! handshake fields are removed, which leaves none behind.
#![no_main]

use kvmesh_filter::disagg::body::strip_router_fields;
use libfuzzer_sys::fuzz_target;
use router_core::request::{parse_request, Endpoint};

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    for endpoint in [Endpoint::Completions, Endpoint::ChatCompletions] {
        let Ok(request) = parse_request(endpoint, data, LIMIT) else {
            continue;
        };
        let stripped = strip_router_fields(data).expect("an accepted body is a JSON object");
        let again = parse_request(endpoint, &stripped, LIMIT).expect("stripping keeps it valid");
        assert!(!again.has_handshake_fields);
        assert_eq!(again.model, request.model);
        assert_eq!(again.prompt, request.prompt);
        assert_eq!(again.cache_salt, request.cache_salt);
    }
});
