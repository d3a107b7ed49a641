//! The TCP listener of kvmesh's HTTP servers, with Nagle's algorithm off.
//!
//! Envoy keeps upstream connections alive. With Nagle on, a small write that
//! follows an unacknowledged one waits for the peer's delayed ACK (40 ms on
//! Linux): the sim-engine's streams held back the next request's first token
//! that long, and the filter's `/v1/tokenize` calls to the sidecar run over
//! such connections too. uvicorn (vLLM, SGLang) and tonic set `TCP_NODELAY`;
//! `axum::serve` leaves it to the listener.

use anyhow::Context;
use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

pub type NoDelayListener = TapIo<TcpListener, fn(&mut TcpStream)>;

/// Binds `address`; every accepted connection gets `TCP_NODELAY`.
pub async fn bind<A>(address: A) -> anyhow::Result<NoDelayListener>
where
    A: ToSocketAddrs + std::fmt::Display,
{
    let listener = TcpListener::bind(&address)
        .await
        .with_context(|| format!("binding {address}"))?;
    Ok(listener.tap_io(set_nodelay as fn(&mut TcpStream)))
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
}
