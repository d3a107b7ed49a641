//! The filter's host: the [`Host`] trait the request path calls, and
//! [`EnvoyHost`], its non-panicking implementation over the proxy-wasm ABI.
//!
//! The SDK's own wrappers (`proxy_wasm::hostcalls`) `panic!` on any status
//! they do not expect, and a panic traps the VM and hands every request on
//! that worker thread to the failure policy. These wrappers return every
//! status as an error instead; the import signatures are the proxy-wasm ABI
//! 0.2.1 ones, with statuses read as raw integers so an unknown value from a
//! newer host cannot be undefined behaviour.

use std::ptr::null_mut;
use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType, MetricType};

#[cfg(test)]
pub mod mock;

/// A status other than `Ok` returned by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError {
    pub call: &'static str,
    pub status: u32,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host call {} returned status {}", self.call, self.status)
    }
}

const STATUS_OK: u32 = 0;
const STATUS_NOT_FOUND: u32 = 1;

mod abi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
        ) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> u32;
        pub fn proxy_set_buffer_bytes(
            buffer_type: u32,
            start: usize,
            size: usize,
            buffer_data: *const u8,
            buffer_size: usize,
        ) -> u32;
        pub fn proxy_send_local_response(
            status_code: u32,
            status_code_details_data: *const u8,
            status_code_details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_continue_stream(stream_type: u32) -> u32;
        pub fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        pub fn proxy_call_foreign_function(
            function_name_data: *const u8,
            function_name_size: usize,
            arguments_data: *const u8,
            arguments_size: usize,
            results_data: *mut *mut u8,
            results_size: *mut usize,
        ) -> u32;
        pub fn proxy_grpc_send(
            token: u32,
            message_data: *const u8,
            message_size: usize,
            end_stream: u32,
        ) -> u32;
        pub fn proxy_grpc_cancel(token: u32) -> u32;
        pub fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
    }
}

fn check(call: &'static str, status: u32) -> Result<(), HostError> {
    if status == STATUS_OK {
        Ok(())
    } else {
        Err(HostError { call, status })
    }
}

/// Takes ownership of a host-allocated buffer (allocated through the SDK's
/// `proxy_on_memory_allocate`, which hands out exactly `size` bytes).
///
/// # Safety
/// `data` must be null or a host-returned allocation of exactly `size` bytes.
unsafe fn take_host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// A header's name and raw value (values need not be UTF-8).
pub type HeaderPair = (Vec<u8>, Vec<u8>);

/// What the filter's request path asks of its host. [`EnvoyHost`] is the
/// proxy-wasm ABI; a recording mock stands in for it in unit tests, so the
/// request path runs in plain `cargo test` without Envoy.
pub trait Host {
    /// All headers of `map`.
    fn header_pairs(&self, map: MapType) -> Result<Vec<HeaderPair>, HostError>;

    /// One header value, `None` when absent.
    fn header(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, HostError>;

    /// Sets (replacing any existing values) a header.
    fn set_header(&self, map: MapType, name: &str, value: &str) -> Result<(), HostError>;

    /// Removes every value of a header.
    fn remove_header(&self, map: MapType, name: &[u8]) -> Result<(), HostError>;

    /// Up to `max` bytes of a buffer from `start`; empty when the buffer is empty.
    fn buffer(&self, buffer: BufferType, start: usize, max: usize) -> Result<Vec<u8>, HostError>;

    /// Replaces `size` bytes of a buffer from `start` with `data`.
    fn set_buffer(
        &self,
        buffer: BufferType,
        start: usize,
        size: usize,
        data: &[u8],
    ) -> Result<(), HostError>;

    /// Answers the request locally; the request never reaches an upstream.
    fn send_response(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError>;

    /// Resumes a request paused by this filter.
    fn resume_request(&self) -> Result<(), HostError>;

    /// Sends an HTTP request to `cluster`; its answer arrives in
    /// `on_http_call_response` with the returned token.
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError>;

    /// Calls a host foreign function (e.g. `clear_route_cache`) without
    /// arguments, discarding any result.
    fn call_foreign_function(&self, name: &str) -> Result<(), HostError>;

    /// A stream property (e.g. `["upstream", "address"]`), `None` when unset.
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;

    /// Host wall-clock time in nanoseconds since the Unix epoch.
    fn now_ns(&self) -> Result<u64, HostError>;

    /// Host wall-clock time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Result<u64, HostError> {
        self.now_ns().map(|nanos| nanos / 1_000_000)
    }

    /// Defines (or looks up, if another VM defined it) a metric.
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, HostError>;

    fn increment_metric(&self, id: u32, offset: i64) -> Result<(), HostError>;

    /// Records one value of a histogram metric.
    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError>;

    /// Sends one message on an open gRPC stream.
    fn send_grpc_stream_message(&self, token: u32, message: &[u8]) -> Result<(), HostError>;
}

/// The proxy-wasm host the filter runs in, called through the ABI.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvoyHost;

/// Response code details of the filter's own replies: Envoy's
/// `local_reply_config` leaves replies with these details as they are.
const LOCAL_REPLY_DETAILS: &str = "kvmesh";

/// `StreamType::HttpRequest` in the proxy-wasm ABI.
const STREAM_HTTP_REQUEST: u32 = 0;

impl Host for EnvoyHost {
    fn header_pairs(&self, map: MapType) -> Result<Vec<HeaderPair>, HostError> {
        let mut data = null_mut();
        let mut size = 0;
        // SAFETY: out-pointers are valid; the returned buffer is taken over below.
        let status = unsafe { abi::proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
        check("proxy_get_header_map_pairs", status)?;
        // SAFETY: on Ok the host returned an allocation of `size` bytes.
        let bytes = unsafe { take_host_buffer(data, size) };
        Ok(decode_pairs(&bytes).unwrap_or_default())
    }

    fn header(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        let mut data = null_mut();
        let mut size = 0;
        // SAFETY: key pointer/length come from a live &str; out-pointers are valid.
        let status = unsafe {
            abi::proxy_get_header_map_value(
                map as u32,
                name.as_ptr(),
                name.len(),
                &mut data,
                &mut size,
            )
        };
        if status == STATUS_NOT_FOUND {
            return Ok(None);
        }
        check("proxy_get_header_map_value", status)?;
        // SAFETY: on Ok the host returned an allocation of `size` bytes.
        Ok(Some(unsafe { take_host_buffer(data, size) }))
    }

    fn set_header(&self, map: MapType, name: &str, value: &str) -> Result<(), HostError> {
        // SAFETY: pointers and lengths come from live &str values.
        let status = unsafe {
            abi::proxy_replace_header_map_value(
                map as u32,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        };
        check("proxy_replace_header_map_value", status)
    }

    fn remove_header(&self, map: MapType, name: &[u8]) -> Result<(), HostError> {
        // SAFETY: pointer and length come from a live slice.
        let status =
            unsafe { abi::proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) };
        check("proxy_remove_header_map_value", status)
    }

    fn buffer(&self, buffer: BufferType, start: usize, max: usize) -> Result<Vec<u8>, HostError> {
        let mut data = null_mut();
        let mut size = 0;
        // SAFETY: out-pointers are valid; the returned buffer is taken over below.
        let status =
            unsafe { abi::proxy_get_buffer_bytes(buffer as u32, start, max, &mut data, &mut size) };
        if status == STATUS_NOT_FOUND {
            return Ok(Vec::new());
        }
        check("proxy_get_buffer_bytes", status)?;
        // SAFETY: on Ok the host returned an allocation of `size` bytes.
        Ok(unsafe { take_host_buffer(data, size) })
    }

    fn set_buffer(
        &self,
        buffer: BufferType,
        start: usize,
        size: usize,
        data: &[u8],
    ) -> Result<(), HostError> {
        // SAFETY: data comes from a live slice.
        let status = unsafe {
            abi::proxy_set_buffer_bytes(buffer as u32, start, size, data.as_ptr(), data.len())
        };
        check("proxy_set_buffer_bytes", status)
    }

    fn send_response(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        let headers = encode_pairs(headers);
        // SAFETY: every pointer/length pair comes from a live buffer.
        let result = unsafe {
            abi::proxy_send_local_response(
                status,
                LOCAL_REPLY_DETAILS.as_ptr(),
                LOCAL_REPLY_DETAILS.len(),
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            )
        };
        check("proxy_send_local_response", result)
    }

    fn resume_request(&self) -> Result<(), HostError> {
        // SAFETY: plain value call.
        let status = unsafe { abi::proxy_continue_stream(STREAM_HTTP_REQUEST) };
        check("proxy_continue_stream", status)
    }

    /// This one goes through the SDK: its dispatcher must record which
    /// context owns the token, or it cannot deliver the answer (and panics on
    /// it). Envoy's `proxy_http_call` answers only `Ok`, `BadArgument` or
    /// `InternalFailure`, the statuses the SDK maps to results.
    #[allow(clippy::disallowed_methods)]
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        proxy_wasm::hostcalls::dispatch_http_call(
            cluster,
            headers.to_vec(),
            Some(body),
            Vec::new(),
            timeout,
        )
        .map_err(|status| HostError {
            call: "proxy_http_call",
            status: status as u32,
        })
    }

    fn call_foreign_function(&self, name: &str) -> Result<(), HostError> {
        let mut data = null_mut();
        let mut size = 0;
        // SAFETY: the name comes from a live &str; out-pointers are valid.
        let status = unsafe {
            abi::proxy_call_foreign_function(
                name.as_ptr(),
                name.len(),
                std::ptr::null(),
                0,
                &mut data,
                &mut size,
            )
        };
        check("proxy_call_foreign_function", status)?;
        // SAFETY: on Ok the host returned null or an allocation of `size` bytes.
        drop(unsafe { take_host_buffer(data, size) });
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        // The ABI's path: the segments, each but the last followed by a NUL.
        let encoded = path.join("\0");
        let mut data = null_mut();
        let mut size = 0;
        // SAFETY: the path comes from a live String; out-pointers are valid.
        let status = unsafe {
            abi::proxy_get_property(encoded.as_ptr(), encoded.len(), &mut data, &mut size)
        };
        if status == STATUS_NOT_FOUND {
            return Ok(None);
        }
        check("proxy_get_property", status)?;
        // SAFETY: on Ok the host returned null or an allocation of `size` bytes.
        Ok(Some(unsafe { take_host_buffer(data, size) }))
    }

    fn now_ns(&self) -> Result<u64, HostError> {
        let mut nanos = 0u64;
        // SAFETY: out-pointer is valid.
        let status = unsafe { abi::proxy_get_current_time_nanoseconds(&mut nanos) };
        check("proxy_get_current_time_nanoseconds", status)?;
        Ok(nanos)
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, HostError> {
        let mut id = 0;
        // SAFETY: name comes from a live &str; out-pointer is valid.
        let status =
            unsafe { abi::proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) };
        check("proxy_define_metric", status)?;
        Ok(id)
    }

    fn increment_metric(&self, id: u32, offset: i64) -> Result<(), HostError> {
        // SAFETY: plain value call.
        let status = unsafe { abi::proxy_increment_metric(id, offset) };
        check("proxy_increment_metric", status)
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        // SAFETY: plain value call.
        let status = unsafe { abi::proxy_record_metric(id, value) };
        check("proxy_record_metric", status)
    }

    fn send_grpc_stream_message(&self, token: u32, message: &[u8]) -> Result<(), HostError> {
        // SAFETY: the message comes from a live slice.
        let status = unsafe { abi::proxy_grpc_send(token, message.as_ptr(), message.len(), 0) };
        check("proxy_grpc_send", status)
    }
}

/// Asks the host to call `on_tick` every `period_ms` milliseconds.
pub fn set_tick_period_ms(period_ms: u32) -> Result<(), HostError> {
    // SAFETY: plain value call.
    let status = unsafe { abi::proxy_set_tick_period_milliseconds(period_ms) };
    check("proxy_set_tick_period_milliseconds", status)
}

/// Opens a gRPC stream to `cluster`; its messages arrive in
/// `on_grpc_stream_message` with the returned token.
///
/// Through the SDK for the same reason as [`EnvoyHost::dispatch_http_call`];
/// Envoy's `proxy_grpc_stream` answers only `Ok`, `ParseFailure` (no such
/// cluster) or `InternalFailure`, all mapped by the SDK.
#[allow(clippy::disallowed_methods)]
pub fn open_grpc_stream(cluster: &str, service: &str, method: &str) -> Result<u32, HostError> {
    proxy_wasm::hostcalls::open_grpc_stream(cluster, service, method, Vec::new()).map_err(
        |status| HostError {
            call: "proxy_grpc_stream",
            status: status as u32,
        },
    )
}

/// Cancels a gRPC stream.
pub fn cancel_grpc_stream(token: u32) -> Result<(), HostError> {
    // SAFETY: plain value call.
    let status = unsafe { abi::proxy_grpc_cancel(token) };
    check("proxy_grpc_cancel", status)
}

/// Serializes header pairs in the proxy-wasm map format:
/// `count:u32, (key_len:u32, value_len:u32)*, (key \0 value \0)*`, little-endian.
fn encode_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let data_len: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data_len);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (key, value) in pairs {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (key, value) in pairs {
        out.extend_from_slice(key.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// Parses the proxy-wasm map format; `None` if the host sent something malformed.
fn decode_pairs(bytes: &[u8]) -> Option<Vec<HeaderPair>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let read_u32 = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(raw) as usize)
    };
    let count = read_u32(0)?;
    let mut data_at = count.checked_mul(8)?.checked_add(4)?;
    let mut pairs = Vec::with_capacity(count.min(bytes.len() / 8));
    for n in 0..count {
        let key_len = read_u32(4 + n * 8)?;
        let value_len = read_u32(8 + n * 8)?;
        let key = bytes.get(data_at..data_at.checked_add(key_len)?)?.to_vec();
        data_at = data_at.checked_add(key_len + 1)?;
        let value = bytes
            .get(data_at..data_at.checked_add(value_len)?)?
            .to_vec();
        data_at = data_at.checked_add(value_len + 1)?;
        pairs.push((key, value));
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs = [("content-type", "application/json"), ("x-a", "")];
        let decoded = decode_pairs(&encode_pairs(&pairs)).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(
            decoded[0],
            (b"content-type".to_vec(), b"application/json".to_vec())
        );
        assert_eq!(decoded[1], (b"x-a".to_vec(), Vec::new()));
    }

    #[test]
    fn malformed_pairs_are_rejected_not_panicking() {
        assert_eq!(decode_pairs(&[]), Some(Vec::new()));
        assert_eq!(decode_pairs(&[5, 0, 0, 0]), None);
        assert_eq!(
            decode_pairs(&[1, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0]),
            None
        );
        assert_eq!(decode_pairs(&[255, 255, 255, 255]), None);
    }
}
