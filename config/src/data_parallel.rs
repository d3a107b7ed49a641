//! The engines' conventions for data-parallel ranks behind one API server
//! (vLLM `--data-parallel-size`, SGLang `--dp-size`), which the relay reads
//! and the sim-engine reproduces: where each rank publishes its KV events,
//! and which label tells its series apart in the shared `/metrics`.

use thiserror::Error;

use crate::EngineKind;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("cannot offset `{endpoint}` by rank {rank}: {reason}")]
pub struct EndpointOffsetError {
    pub endpoint: String,
    pub rank: u32,
    pub reason: &'static str,
}

/// The endpoint rank `rank`'s publisher binds, given the one configured for
/// the engine: the engines offset a TCP port by the rank and suffix an
/// in-process name with `_dp<rank>`, and leave rank 0's as configured.
pub fn offset_endpoint(endpoint: &str, rank: u32) -> Result<String, EndpointOffsetError> {
    let error = |reason| EndpointOffsetError {
        endpoint: endpoint.to_owned(),
        rank,
        reason,
    };
    if rank == 0 {
        return Ok(endpoint.to_owned());
    }
    if endpoint.starts_with("inproc://") {
        return Ok(format!("{endpoint}_dp{rank}"));
    }
    let (host, port) = tcp_host_port(endpoint).map_err(error)?;
    if port == 0 {
        return Err(error(
            "port 0 is chosen by the OS, so the rank's port is unknown",
        ));
    }
    let port = u32::from(port)
        .checked_add(rank)
        .and_then(|port| u16::try_from(port).ok())
        .ok_or_else(|| error("the rank's port is past 65535"))?;
    Ok(format!("tcp://{host}:{port}"))
}

/// `tcp://host:port` → (host, port).
pub fn tcp_host_port(endpoint: &str) -> Result<(&str, u16), &'static str> {
    let address = endpoint
        .strip_prefix("tcp://")
        .ok_or("only tcp:// and inproc:// endpoints are offset by rank")?;
    let (host, port) = address.rsplit_once(':').ok_or("no port")?;
    let port = port.parse().map_err(|_| "the port is not a number")?;
    Ok((host, port))
}

/// Whether ranks `0..=rank` of an engine configured with these two TCP
/// endpoints would bind one port twice: each rank binds both ports plus its
/// rank, so ports on one host must lie more than `rank` apart (vLLM's
/// `endpoint` 5557 and `replay_endpoint` 5558 cannot run two ranks).
pub fn ranks_collide(publish: &str, replay: &str, rank: u32) -> bool {
    match (tcp_host_port(publish), tcp_host_port(replay)) {
        (Ok((publish_host, publish)), Ok((replay_host, replay))) => {
            publish_host == replay_host && u32::from(publish.abs_diff(replay)) <= rank
        }
        _ => false,
    }
}

/// The label naming a rank's series in the engine's `/metrics`: vLLM labels
/// every engine core's with `engine`, SGLang every scheduler's with
/// `dp_rank`. TensorRT-LLM has no such ranks.
pub fn rank_label(engine: EngineKind) -> Option<&'static str> {
    match engine {
        EngineKind::Vllm => Some("engine"),
        EngineKind::Sglang => Some("dp_rank"),
        EngineKind::Trtllm => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_offset_as_the_engines_offset_them() {
        assert_eq!(offset_endpoint("tcp://*:5557", 0).unwrap(), "tcp://*:5557");
        assert_eq!(
            offset_endpoint("tcp://10.0.0.8:5557", 3).unwrap(),
            "tcp://10.0.0.8:5560"
        );
        assert_eq!(
            offset_endpoint("tcp://[::1]:5557", 1).unwrap(),
            "tcp://[::1]:5558"
        );
        assert_eq!(
            offset_endpoint("inproc://cache", 2).unwrap(),
            "inproc://cache_dp2"
        );
        for bad in [
            "tcp://host:0",
            "tcp://host:65535",
            "tcp://host",
            "ipc:///tmp/x",
        ] {
            assert!(offset_endpoint(bad, 1).is_err(), "{bad}");
        }
        assert!(offset_endpoint("tcp://host:5557", u32::MAX).is_err());
        assert_eq!(
            offset_endpoint("tcp://host", 1).unwrap_err().reason,
            "no port"
        );
    }

    #[test]
    fn ports_closer_than_the_ranks_collide() {
        let (publish, replay) = ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558");
        assert!(!ranks_collide(publish, replay, 0));
        assert!(ranks_collide(publish, replay, 1));
        assert!(ranks_collide(replay, publish, 1));
        assert!(!ranks_collide(publish, "tcp://127.0.0.1:5657", 99));
        assert!(ranks_collide(publish, "tcp://127.0.0.1:5657", 100));
        assert!(!ranks_collide(publish, "tcp://10.0.0.2:5558", 1));
        assert!(!ranks_collide("inproc://a", "inproc://b", 3));
    }
}
