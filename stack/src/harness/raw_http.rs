//! Requests the usual clients cannot send: HTTP/2 with or without request
//! trailers (h2c, prior knowledge), and chunked HTTP/1.1 with a trailer
//! section, written byte for byte.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A response as the gateway sent it.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// POSTs `body` to `path` over HTTP/2 cleartext, ending the request with
/// `trailers` when given (the body then never carries end-of-stream).
pub fn h2_post(
    authority: &str,
    path: &str,
    body: Vec<u8>,
    trailers: Option<&[(&str, &str)]>,
) -> anyhow::Result<RawResponse> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::time::timeout(TIMEOUT, h2_exchange(authority, path, body, trailers))
            .await
            .context("HTTP/2 request timed out")?
    })
}

async fn h2_exchange(
    authority: &str,
    path: &str,
    body: Vec<u8>,
    trailers: Option<&[(&str, &str)]>,
) -> anyhow::Result<RawResponse> {
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await?;
    let request = http::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/json")
        .body(())?;
    let (response, mut stream) = client.send_request(request, false)?;
    stream.send_data(body.into(), trailers.is_none())?;
    if let Some(trailers) = trailers {
        let mut map = http::HeaderMap::new();
        for (name, value) in trailers {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes())?,
                http::HeaderValue::from_str(value)?,
            );
        }
        stream.send_trailers(map)?;
    }
    let response = response.await?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let mut received = response.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = received.data().await {
        let chunk = chunk?;
        received.flow_control().release_capacity(chunk.len())?;
        body.extend_from_slice(&chunk);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// POSTs `body` to `path` over HTTP/1.1 as one chunk followed by a trailer
/// section, on a connection closed after the response.
pub fn h1_chunked_post_with_trailers(
    authority: &str,
    path: &str,
    body: &[u8],
    trailers: &[(&str, &str)],
) -> anyhow::Result<RawResponse> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request.extend_from_slice(b"\r\n0\r\n");
    for (name, value) in trailers {
        request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    http1_exchange(authority, &request)
}

/// Writes `request` byte for byte and reads the answer until the server
/// closes the connection (the request must ask for that, or be HTTP/1.0).
pub fn http1_exchange(authority: &str, request: &[u8]) -> anyhow::Result<RawResponse> {
    let mut tcp = TcpStream::connect(authority)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.write_all(request)?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)?;
    parse_http1_response(&raw)
}

fn parse_http1_response(raw: &[u8]) -> anyhow::Result<RawResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of response headers")?;
    let head = std::str::from_utf8(&raw[..split])?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let payload = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(payload)?
    } else {
        payload.to_vec()
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = payload
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = std::str::from_utf8(&payload[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        payload = &payload[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(payload.get(..size).context("truncated chunk")?);
        payload = payload.get(size + 2..).context("truncated chunk end")?;
    }
}
