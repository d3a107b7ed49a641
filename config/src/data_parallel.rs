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
    if !endpoint.starts_with("tcp://") {
        return Err(error(
            "only tcp:// and inproc:// endpoints are offset by rank",
        ));
    }
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| error("no port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| error("the port is not a number"))?;
    if port == 0 {
        return Err(error(
            "port 0 is chosen by the OS, so the rank's port is unknown",
        ));
    }
    let port = u16::try_from(u32::from(port) + rank)
        .map_err(|_| error("the rank's port is past 65535"))?;
    Ok(format!("{host}:{port}"))
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
    }
}
