//! A [`Host`] for unit tests: the test sets header maps, buffers, properties
//! and the clock; local responses, callouts, resumes, foreign calls, metrics
//! and gRPC messages are recorded for it to check. Header names match
//! case-insensitively, as in Envoy.

use std::cell::{Ref, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType, MetricType};

use super::{HeaderPair, Host, HostError};

/// A handle on one recording: the stream under test owns a clone, the test
/// keeps another.
#[derive(Clone, Default)]
pub struct MockHost(Rc<RefCell<Recorded>>);

pub type Headers = Vec<(String, String)>;

#[derive(Default)]
pub struct Recorded {
    maps: HashMap<MapType, Headers>,
    buffers: HashMap<BufferType, Vec<u8>>,
    properties: HashMap<String, Vec<u8>>,
    now_ns: u64,
    /// Metric names by id.
    metrics: Vec<String>,
    counters: HashMap<String, i64>,
    histograms: HashMap<String, Vec<u64>>,
    pub responses: Vec<LocalResponse>,
    pub callouts: Vec<Callout>,
    pub resumed: usize,
    pub foreign_calls: Vec<String>,
    /// (stream token, message) of every gRPC stream message sent.
    pub grpc_messages: Vec<(u32, Vec<u8>)>,
}

pub struct LocalResponse {
    pub status: u32,
    pub headers: Headers,
    pub body: Vec<u8>,
}

pub struct Callout {
    pub token: u32,
    pub cluster: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

impl Callout {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name.as_bytes()).map(|(_, value)| value.as_str())
    }
}

fn find<'a>(headers: &'a Headers, name: &[u8]) -> Option<&'a (String, String)> {
    headers
        .iter()
        .find(|(key, _)| key.as_bytes().eq_ignore_ascii_case(name))
}

fn owned(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

impl MockHost {
    pub fn recorded(&self) -> Ref<'_, Recorded> {
        self.0.borrow()
    }

    /// Replaces a whole header map.
    pub fn set_headers(&self, map: MapType, pairs: &[(&str, &str)]) {
        self.0.borrow_mut().maps.insert(map, owned(pairs));
    }

    pub fn headers(&self, map: MapType) -> Headers {
        self.0.borrow().maps.get(&map).cloned().unwrap_or_default()
    }

    pub fn get(&self, map: MapType, name: &str) -> Option<String> {
        let recorded = self.0.borrow();
        let headers = recorded.maps.get(&map)?;
        find(headers, name.as_bytes()).map(|(_, value)| value.clone())
    }

    pub fn set_body(&self, buffer: BufferType, bytes: &[u8]) {
        self.0.borrow_mut().buffers.insert(buffer, bytes.to_vec());
    }

    pub fn body(&self, buffer: BufferType) -> Vec<u8> {
        self.0
            .borrow()
            .buffers
            .get(&buffer)
            .cloned()
            .unwrap_or_default()
    }

    pub fn set_property(&self, path: &[&str], value: &str) {
        self.0
            .borrow_mut()
            .properties
            .insert(path.join("."), value.as_bytes().to_vec());
    }

    pub fn set_now_ms(&self, now_ms: u64) {
        self.0.borrow_mut().now_ns = now_ms * 1_000_000;
    }

    /// A counter's value; 0 when it was never incremented.
    pub fn counter(&self, name: &str) -> i64 {
        self.0.borrow().counters.get(name).copied().unwrap_or(0)
    }

    /// Values recorded in a histogram.
    pub fn samples(&self, name: &str) -> usize {
        self.0.borrow().histograms.get(name).map_or(0, Vec::len)
    }

    fn metric(&self, id: u32) -> Result<String, HostError> {
        let recorded = self.0.borrow();
        let name = usize::try_from(id)
            .ok()
            .and_then(|id| recorded.metrics.get(id));
        name.cloned().ok_or(HostError {
            call: "proxy_metric",
            status: 1,
        })
    }
}

impl Host for MockHost {
    fn header_pairs(&self, map: MapType) -> Result<Vec<HeaderPair>, HostError> {
        Ok(self
            .headers(map)
            .into_iter()
            .map(|(name, value)| (name.into_bytes(), value.into_bytes()))
            .collect())
    }

    fn header(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.get(map, name).map(String::into_bytes))
    }

    fn set_header(&self, map: MapType, name: &str, value: &str) -> Result<(), HostError> {
        self.remove_header(map, name.as_bytes())?;
        let mut recorded = self.0.borrow_mut();
        let headers = recorded.maps.entry(map).or_default();
        headers.push((name.to_owned(), value.to_owned()));
        Ok(())
    }

    fn remove_header(&self, map: MapType, name: &[u8]) -> Result<(), HostError> {
        if let Some(headers) = self.0.borrow_mut().maps.get_mut(&map) {
            headers.retain(|(key, _)| !key.as_bytes().eq_ignore_ascii_case(name));
        }
        Ok(())
    }

    fn buffer(&self, buffer: BufferType, start: usize, max: usize) -> Result<Vec<u8>, HostError> {
        let bytes = self.body(buffer);
        let end = start.saturating_add(max).min(bytes.len());
        Ok(bytes.get(start..end).unwrap_or_default().to_vec())
    }

    fn set_buffer(
        &self,
        buffer: BufferType,
        start: usize,
        size: usize,
        data: &[u8],
    ) -> Result<(), HostError> {
        let mut recorded = self.0.borrow_mut();
        let bytes = recorded.buffers.entry(buffer).or_default();
        let start = start.min(bytes.len());
        let end = start.saturating_add(size).min(bytes.len());
        bytes.splice(start..end, data.iter().copied());
        Ok(())
    }

    fn send_response(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        self.0.borrow_mut().responses.push(LocalResponse {
            status,
            headers: owned(headers),
            body: body.to_vec(),
        });
        Ok(())
    }

    fn resume_request(&self) -> Result<(), HostError> {
        self.0.borrow_mut().resumed += 1;
        Ok(())
    }

    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        let mut recorded = self.0.borrow_mut();
        let token = u32::try_from(recorded.callouts.len() + 1).unwrap_or(u32::MAX);
        recorded.callouts.push(Callout {
            token,
            cluster: cluster.to_owned(),
            headers: owned(headers),
            body: body.to_vec(),
            timeout,
        });
        Ok(token)
    }

    fn call_foreign_function(&self, name: &str) -> Result<(), HostError> {
        self.0.borrow_mut().foreign_calls.push(name.to_owned());
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.0.borrow().properties.get(&path.join(".")).cloned())
    }

    fn now_ns(&self) -> Result<u64, HostError> {
        Ok(self.0.borrow().now_ns)
    }

    fn define_metric(&self, _kind: MetricType, name: &str) -> Result<u32, HostError> {
        let mut recorded = self.0.borrow_mut();
        let id = match recorded.metrics.iter().position(|known| known == name) {
            Some(id) => id,
            None => {
                recorded.metrics.push(name.to_owned());
                recorded.metrics.len() - 1
            }
        };
        Ok(u32::try_from(id).unwrap_or(u32::MAX))
    }

    fn increment_metric(&self, id: u32, offset: i64) -> Result<(), HostError> {
        let name = self.metric(id)?;
        *self.0.borrow_mut().counters.entry(name).or_default() += offset;
        Ok(())
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        let name = self.metric(id)?;
        let mut recorded = self.0.borrow_mut();
        recorded.histograms.entry(name).or_default().push(value);
        Ok(())
    }

    fn send_grpc_stream_message(&self, token: u32, message: &[u8]) -> Result<(), HostError> {
        let mut recorded = self.0.borrow_mut();
        recorded.grpc_messages.push((token, message.to_vec()));
        Ok(())
    }
}
