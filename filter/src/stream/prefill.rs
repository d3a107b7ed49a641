//! The prefill leg of a disaggregated request (docs/sim-engine.md#disaggregated-prefill-all-three-handshakes), run by the
//! filter itself: a callout to the prefill pool, steered to the chosen
//! prefill worker by the override header, then the decode leg with what the
//! prefill returned. Any failure of the prefill leg sends the request to its
//! decode worker unchanged, which then prefills locally.

use proxy_wasm::types::{BufferType, MapType};
use router_core::routing::inflight::{RequestLoad, Ticket};
use router_core::routing::Decision;
use router_core::target::DATA_PARALLEL_RANK_HEADER;
use router_core::Target;
use thiserror::Error;

use super::{
    is_worker_failure, BufferedBody, InferenceStream, Phase, Routed, Steered, DESTINATION_HEADER,
};
use crate::config::{Disaggregation, Protocol};
use crate::disagg::body::{self, BodyError, ContextOutcome};
use crate::host::Host;

/// Client headers the prefill leg carries too.
const FORWARDED_HEADERS: [&str; 4] = ["authorization", "traceparent", "tracestate", "baggage"];

/// A prefill leg in flight: its callout, and the prefill worker with its
/// share of in-flight load until the leg answers.
pub(super) struct PrefillLeg {
    pub(super) token: u32,
    pub(super) worker: Steered,
}

/// A request whose decode leg waits for its prefill leg.
pub(super) struct PrefillWait {
    pub(super) leg: PrefillLeg,
    /// The decode worker's share of in-flight load meanwhile: the KV blocks
    /// it is about to receive, so that other decisions do not see it idle.
    pub(super) decode_hold: Option<Ticket>,
    protocol: Protocol,
    /// The size of the request body Envoy holds (router fields already
    /// stripped); it is read again when the leg answers rather than copied,
    /// so a request waiting for its prefill costs the VM no body memory.
    body_size: usize,
    client_streams: bool,
    decode: Decision,
    block_size: u64,
}

/// Why a request was prefilled by its decode worker after all.
#[derive(Debug, Error)]
enum LocalPrefill {
    #[error("the prefill pool could not be called")]
    Dispatch,
    #[error("the prefill leg failed or timed out")]
    Status,
    #[error("the request body could not be read or rewritten")]
    Body,
    #[error(transparent)]
    Response(BodyError),
}

impl<H: Host> InferenceStream<H> {
    /// Starts the prefill leg on `prefill` for a request whose decode leg
    /// goes to `decode`: the request waits for the leg, or (SGLang, or when
    /// the leg cannot start) is routed to its decode worker at once.
    pub(super) fn start_prefill(
        &self,
        disaggregation: &Disaggregation,
        decode: Decision,
        prefill: &Decision,
        block_size: u64,
        buffered: BufferedBody,
    ) -> Phase {
        let (Some(target), Some(body)) =
            (prefill.target.clone(), self.buffered_body(buffered.size))
        else {
            return self.decode_locally(&decode, block_size, LocalPrefill::Dispatch);
        };
        let protocol = disaggregation.protocol;
        let leg = match protocol {
            Protocol::Vllm => body::vllm_prefill(&body),
            Protocol::Trtllm => body::trtllm_context(&body),
            Protocol::Sglang => {
                let host = target
                    .address()
                    .parse::<std::net::SocketAddr>()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let room = self.state.borrow_mut().next_random() >> 1;
                let rank = target.data_parallel_rank();
                body::sglang(&body, &host, disaggregation.bootstrap_port, room, rank)
            }
        };
        let Ok(leg) = leg else {
            return self.decode_locally(&decode, block_size, LocalPrefill::Dispatch);
        };
        drop(body);
        let ticket = self.admit_prefill(prefill, target.key(), block_size);
        let Some(token) = self.dispatch_prefill(disaggregation, &target, &leg) else {
            self.finish(ticket);
            return self.decode_locally(&decode, block_size, LocalPrefill::Dispatch);
        };
        let prefill_leg = PrefillLeg {
            token,
            worker: Steered { target, ticket },
        };
        if protocol == Protocol::Sglang {
            // Both legs at once: the decode engine meets the prefill at its
            // bootstrap server; the prefill's own answer is not needed.
            if !self.replace_body(buffered.size, &leg) {
                // The leg already went: its answer, for no request now, is
                // ignored (not blamed on its worker) when it comes.
                self.finish(prefill_leg.worker.ticket);
                return self.decode_locally(&decode, block_size, LocalPrefill::Body);
            }
            let prefill_worker = prefill_leg.worker.target.key().to_owned();
            return Phase::Routed(Routed {
                prefill: Some(prefill_leg),
                ..self.apply_decision(&decode, block_size, Some(&prefill_worker))
            });
        }
        Phase::AwaitingPrefill(PrefillWait {
            leg: prefill_leg,
            decode_hold: self.hold_decode_worker(&decode),
            protocol,
            body_size: buffered.size,
            client_streams: buffered.client_streams,
            decode,
            block_size,
        })
    }

    /// The prefill leg the decode leg waited for answered (or failed, or
    /// timed out).
    pub(super) fn on_prefill_response(&self, wait: PrefillWait, body_size: usize) -> Phase {
        let PrefillWait {
            leg,
            decode_hold,
            protocol,
            body_size: buffered_size,
            client_streams,
            decode,
            block_size,
        } = wait;
        let Steered {
            target: prefill_worker,
            ticket,
        } = leg.worker;
        self.finish(ticket);
        if let Some(hold) = decode_hold {
            self.finish(hold);
        }
        let outcome = if !self.call_succeeded() {
            self.hold_failed_prefill_worker(prefill_worker.address());
            Err(LocalPrefill::Status)
        } else if let Some(body) = self.buffered_body(buffered_size) {
            let response = self
                .host
                .buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .unwrap_or_default();
            match protocol {
                Protocol::Vllm => body::vllm_transfer_params(&response)
                    .and_then(|params| body::vllm_decode(&body, &params)),
                Protocol::Trtllm => match body::trtllm_context_outcome(&response) {
                    Ok(ContextOutcome::Finished) if !client_streams => {
                        // The context leg produced the whole answer.
                        self.metrics.remote_prefills.inc(&self.host);
                        return self.answer_from_context(&response);
                    }
                    Ok(ContextOutcome::Finished) => {
                        Err(BodyError::MissingParams("disaggregated_params"))
                    }
                    Ok(ContextOutcome::Generate(params)) => body::trtllm_generation(&body, &params),
                    Err(err) => Err(err),
                },
                // SGLang's decode leg never waits for its prefill.
                Protocol::Sglang => Ok(body),
            }
            .map_err(LocalPrefill::Response)
        } else {
            Err(LocalPrefill::Body)
        };
        let outcome = outcome.and_then(|decode_leg| {
            if self.replace_body(buffered_size, &decode_leg) {
                Ok(())
            } else {
                Err(LocalPrefill::Body)
            }
        });
        match outcome {
            Ok(()) => {
                self.metrics.remote_prefills.inc(&self.host);
                Phase::Routed(self.apply_decision(&decode, block_size, Some(prefill_worker.key())))
            }
            Err(reason) => self.decode_locally(&decode, block_size, reason),
        }
    }

    /// SGLang: the prefill leg running beside the decode leg answered.
    pub(super) fn on_prefill_beside(&self, leg: PrefillLeg) {
        if self.call_succeeded() {
            self.metrics.remote_prefills.inc(&self.host);
        } else {
            self.hold_failed_prefill_worker(leg.worker.target.address());
            self.metrics.prefill_failures.inc(&self.host);
        }
        self.finish(leg.worker.ticket);
    }

    /// A prefill leg that timed out, could not connect or got a 5xx or 429
    /// says its worker is failing (after two in a row it is left out, as a
    /// decode worker would be). A 4xx is the request's fault.
    fn hold_failed_prefill_worker(&self, worker: &str) {
        let worker_failed = self
            .status(MapType::HttpCallResponseHeaders)
            .is_none_or(is_worker_failure);
        if worker_failed {
            self.worker_errored(worker);
        }
    }

    /// The decode worker's share of load while the prefill leg runs.
    fn hold_decode_worker(&self, decode: &Decision) -> Option<Ticket> {
        let target = decode.target.as_ref()?;
        Some(self.state.borrow_mut().router.inflight.admit(RequestLoad {
            decode: target.key(),
            prefill: None,
            prefill_tokens: 0,
            blocks: u64::from(decode.prompt_blocks),
        }))
    }

    /// The decode worker computes the prompt itself.
    fn decode_locally(&self, decode: &Decision, block_size: u64, reason: LocalPrefill) -> Phase {
        log::info!("prefilling locally: {reason}");
        self.metrics.prefill_failures.inc(&self.host);
        Phase::Routed(self.apply_decision(decode, block_size, None))
    }

    fn dispatch_prefill(
        &self,
        disaggregation: &Disaggregation,
        target: &Target,
        leg: &[u8],
    ) -> Option<u32> {
        let path = self.request_header(":path")?;
        let request_id = self.request_id();
        // The engine may check the client's credentials (vLLM and SGLang's
        // `--api-key`), and traces should follow both legs.
        let forwarded: Vec<(&str, String)> = FORWARDED_HEADERS
            .iter()
            .filter_map(|&name| Some((name, self.request_header(name)?)))
            .collect();
        let mut headers = vec![
            (":method", "POST"),
            (":path", path.as_str()),
            (":authority", "kvmesh-prefill"),
            ("content-type", "application/json"),
            ("x-request-id", request_id.as_str()),
            (DESTINATION_HEADER, target.address()),
        ];
        let rank = target.data_parallel_rank().map(|rank| rank.to_string());
        if let Some(rank) = &rank {
            headers.push((DATA_PARALLEL_RANK_HEADER, rank));
        }
        headers.extend(
            forwarded
                .iter()
                .map(|(name, value)| (*name, value.as_str())),
        );
        match self.host.dispatch_http_call(
            &disaggregation.prefill_cluster,
            &headers,
            leg,
            disaggregation.timeout,
        ) {
            Ok(token) => Some(token),
            Err(err) => {
                log::warn!(
                    "cannot call the prefill pool {}: {err}",
                    disaggregation.prefill_cluster
                );
                None
            }
        }
    }

    /// One request id for both legs: the client's, or one made up here.
    fn request_id(&self) -> String {
        if let Some(id) = self.request_header("x-request-id") {
            return id;
        }
        let id = self.state.borrow_mut().reporter.next_request_id();
        if let Err(err) = self
            .host
            .set_header(MapType::HttpRequestHeaders, "x-request-id", &id)
        {
            self.host_error(err);
        }
        id
    }

    fn admit_prefill(&self, prefill: &Decision, key: &str, block_size: u64) -> Ticket {
        let uncached = u64::from(prefill.uncached_blocks());
        // The prefill worker holds the prompt's blocks until it hands them over.
        self.state.borrow_mut().router.inflight.admit(RequestLoad {
            decode: key,
            prefill: None,
            prefill_tokens: uncached * block_size,
            blocks: u64::from(prefill.prompt_blocks),
        })
    }

    /// TensorRT-LLM: the context leg finished the request; answer with it.
    fn answer_from_context(&self, response: &[u8]) -> Phase {
        let headers = [("content-type", "application/json")];
        if let Err(err) = self.host.send_response(200, &headers, response) {
            self.host_error(err);
        }
        Phase::Answered
    }

    /// The buffered request body of `size` bytes (already validated as a
    /// JSON object).
    fn buffered_body(&self, size: usize) -> Option<Vec<u8>> {
        self.host.buffer(BufferType::HttpRequestBody, 0, size).ok()
    }

    /// Replaces the buffered request body (`size` bytes) and its length;
    /// false if the host refused.
    pub(super) fn replace_body(&self, size: usize, bytes: &[u8]) -> bool {
        if let Err(err) = self
            .host
            .set_buffer(BufferType::HttpRequestBody, 0, size, bytes)
        {
            self.host_error(err);
            return false;
        }
        let length = bytes.len().to_string();
        if let Err(err) =
            self.host
                .set_header(MapType::HttpRequestHeaders, "content-length", &length)
        {
            self.host_error(err);
        }
        true
    }
}
