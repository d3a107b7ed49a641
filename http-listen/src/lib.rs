//! The TCP listener of kvmesh's HTTP servers, with Nagle's algorithm off.
//!
//! Envoy keeps upstream connections alive. With Nagle on, a small write that
//! follows an unacknowledged one waits for the peer's delayed ACK (40 ms on
//! Linux): the sim-engine's streams held back the next request's first token
//! that long, and the filter's `/v1/tokenize` calls to the sidecar run over
//! such connections too. uvicorn (vLLM, SGLang) and tonic set `TCP_NODELAY`;
//! `axum::serve` leaves it to the listener.
//!
//! Its accept queue is deeper than tokio's default too ([`BACKLOG`]).

use std::io;
use std::net::SocketAddr;

use anyhow::Context;
use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpSocket, TcpStream, ToSocketAddrs};

pub type NoDelayListener = TapIo<TcpListener, fn(&mut TcpStream)>;

/// Length of the queue of connections the kernel has accepted for us. Envoy's
/// HTTP/1.1 pools open one upstream connection per concurrent request, and
/// tokio's default of 1,024 overflowed when 3,000 streams reached three
/// engines at once: the kernel drops a SYN it cannot queue, and the client's retry comes
/// 1 s and then 3 s later, past the pools' 2 s connect timeout. uvicorn (vLLM,
/// SGLang) asks for 2,048; Linux caps the value at `net.core.somaxconn`
/// (4,096 by default since 5.4).
pub const BACKLOG: u32 = 8_192;

/// Binds `address` with a [`BACKLOG`]-long accept queue; every accepted
/// connection gets `TCP_NODELAY`.
pub async fn bind<A>(address: A) -> anyhow::Result<NoDelayListener>
where
    A: ToSocketAddrs + std::fmt::Display,
{
    let mut last_error = None;
    for candidate in tokio::net::lookup_host(&address)
        .await
        .with_context(|| format!("resolving {address}"))?
    {
        match listen(candidate) {
            Ok(listener) => return Ok(listener.tap_io(set_nodelay as fn(&mut TcpStream))),
            Err(error) => last_error = Some(error),
        }
    }
    let error = last_error
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind"));
    Err(error).with_context(|| format!("binding {address}"))
}

fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted server must rebind its port
    // while the previous run's connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

fn set_nodelay(stream: &mut TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::warn!(%error, "could not set TCP_NODELAY on a connection");
    }
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let mut listener = super::bind("127.0.0.1:0").await.unwrap();
        let address = Listener::local_addr(&listener).unwrap();
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let (accepted, _) = Listener::accept(&mut listener).await;
        assert!(accepted.nodelay().unwrap());
    }

    /// Connections beyond the accept queue wait for a SYN retransmission
    /// (1 s). Twice tokio's default queue completes at once, even though the
    /// server accepts none of them (less where the kernel caps it lower).
    #[tokio::test]
    async fn a_burst_beyond_tokios_default_backlog_connects_without_accepting() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(u32::MAX);
        let burst = somaxconn.min(2_000) as usize;
        let listener = super::bind("127.0.0.1:0").await.unwrap();
        let address = Listener::local_addr(&listener).unwrap();
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..burst {
            connects.spawn(tokio::time::timeout(
                std::time::Duration::from_millis(800),
                tokio::net::TcpStream::connect(address),
            ));
        }
        // Held until the end so that no connection leaves the queue.
        let mut open = Vec::with_capacity(burst);
        while let Some(joined) = connects.join_next().await {
            if let Ok(Ok(stream)) = joined.unwrap() {
                open.push(stream);
            }
        }
        assert_eq!(open.len(), burst, "connections completed without accept");
    }
}
