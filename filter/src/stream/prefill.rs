//! The prefill leg of a disaggregated request (docs/sim-engine.md#disaggregated-prefill-all-three-handshakes), run by the
//! filter itself: a callout to the prefill pool, steered to the chosen
//! prefill worker by the override header, then the decode leg with what the
//! prefill returned. Any failure of the prefill leg sends the request to its
//! decode worker unchanged, which then prefills locally.

use proxy_wasm::types::{BufferType, MapType};
use router_core::routing::inflight::RequestLoad;
use router_core::routing::Decision;
use thiserror::Error;

use super::{call_succeeded, InferenceStream, Next, DESTINATION_HEADER};
use crate::config::{Disaggregation, Protocol};
use crate::disagg::body::{self, BodyError, ContextOutcome};
use crate::host;

/// A request whose prefill leg is in flight.
pub(super) struct PrefillWait {
    protocol: Protocol,
    /// The original request (router fields already stripped).
    body: Vec<u8>,
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
    #[error(transparent)]
    Response(BodyError),
}

impl InferenceStream {
    /// Starts the prefill leg on `prefill` for a request whose decode leg
    /// goes to `decode`. `Next::Wait` while the leg is in flight; otherwise
    /// the decode leg is already set up.
    pub(super) fn start_prefill(
        &mut self,
        disaggregation: &Disaggregation,
        decode: Decision,
        prefill: &Decision,
        block_size: u64,
    ) -> Next {
        let (Some(address), Some(body)) = (prefill.address.clone(), self.buffered_body()) else {
            return self.decode_locally(decode, block_size, LocalPrefill::Dispatch);
        };
        let protocol = disaggregation.protocol;
        let leg = match protocol {
            Protocol::Vllm => body::vllm_prefill(&body),
            Protocol::Trtllm => body::trtllm_context(&body),
            Protocol::Sglang => {
                let host = address
                    .parse::<std::net::SocketAddr>()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let room = self.state.borrow_mut().next_random() >> 1;
                body::sglang(&body, &host, disaggregation.bootstrap_port, room)
            }
        };
        let Ok(leg) = leg else {
            return self.decode_locally(decode, block_size, LocalPrefill::Dispatch);
        };
        self.admit_prefill(prefill, &address, block_size);
        let Some(token) = self.dispatch_prefill(disaggregation, &address, &leg) else {
            self.finish_prefill_ticket();
            return self.decode_locally(decode, block_size, LocalPrefill::Dispatch);
        };
        self.prefill_call = Some(token);
        if protocol == Protocol::Sglang {
            // Both legs at once: the decode engine meets the prefill at its
            // bootstrap server; the prefill's own answer is not needed.
            self.replace_body(&leg);
            self.apply_decision(&decode, block_size, true);
            return Next::Continue;
        }
        self.prefill = Some(PrefillWait {
            protocol,
            body,
            decode,
            block_size,
        });
        Next::Wait
    }

    /// The prefill leg answered (or failed, or timed out).
    pub(super) fn on_prefill_response(&mut self, body_size: usize) {
        self.finish_prefill_ticket();
        let ok = call_succeeded();
        let Some(wait) = self.prefill.take() else {
            // SGLang: the decode leg is already on its way.
            if ok {
                self.metrics.remote_prefills.inc();
            } else {
                self.metrics.prefill_failures.inc();
            }
            return;
        };
        let response = if ok {
            host::buffer(BufferType::HttpCallResponseBody, 0, body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let PrefillWait {
            protocol,
            body,
            decode,
            block_size,
        } = wait;
        let outcome = if !ok {
            Err(LocalPrefill::Status)
        } else {
            match protocol {
                Protocol::Vllm => body::vllm_transfer_params(&response)
                    .and_then(|params| body::vllm_decode(&body, &params)),
                Protocol::Trtllm => match body::trtllm_context_outcome(&response) {
                    Ok(ContextOutcome::Finished) if !self.client_streams => {
                        // The context leg produced the whole answer.
                        self.metrics.remote_prefills.inc();
                        self.answer_from_context(&response);
                        return;
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
        };
        match outcome {
            Ok(decode_leg) => {
                self.metrics.remote_prefills.inc();
                self.replace_body(&decode_leg);
                self.apply_decision(&decode, block_size, true);
            }
            Err(reason) => {
                self.decode_locally(decode, block_size, reason);
            }
        }
        if let Err(err) = host::resume_request() {
            self.host_error(err);
        }
    }

    /// The decode worker computes the prompt itself.
    fn decode_locally(&mut self, decode: Decision, block_size: u64, reason: LocalPrefill) -> Next {
        log::info!("prefilling locally: {reason}");
        self.metrics.prefill_failures.inc();
        self.apply_decision(&decode, block_size, false);
        Next::Continue
    }

    fn dispatch_prefill(
        &mut self,
        disaggregation: &Disaggregation,
        address: &str,
        leg: &[u8],
    ) -> Option<u32> {
        let path = self.request_header(":path")?;
        let request_id = self.request_id();
        let headers = [
            (":method", "POST"),
            (":path", path.as_str()),
            (":authority", "kvmesh-prefill"),
            ("content-type", "application/json"),
            ("x-request-id", request_id.as_str()),
            (DESTINATION_HEADER, address),
        ];
        match host::dispatch_http_call(
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
    fn request_id(&mut self) -> String {
        if let Some(id) = self.request_header("x-request-id") {
            return id;
        }
        let id = self.state.borrow_mut().reporter.next_request_id();
        if let Err(err) = host::set_header(MapType::HttpRequestHeaders, "x-request-id", &id) {
            self.host_error(err);
        }
        id
    }

    fn admit_prefill(&mut self, prefill: &Decision, address: &str, block_size: u64) {
        let uncached = u64::from(prefill.prompt_blocks.saturating_sub(prefill.cached_blocks));
        // The prefill worker holds the prompt's blocks until it hands them over.
        let ticket = self.state.borrow_mut().router.inflight.admit(RequestLoad {
            decode: address,
            prefill: None,
            prefill_tokens: uncached * block_size,
            blocks: u64::from(prefill.prompt_blocks),
        });
        self.prefill_ticket = Some(ticket);
    }

    pub(super) fn finish_prefill_ticket(&mut self) {
        if let Some(ticket) = self.prefill_ticket.take() {
            self.state.borrow_mut().router.inflight.finish(ticket);
        }
    }

    /// TensorRT-LLM: the context leg finished the request; answer with it.
    fn answer_from_context(&self, response: &[u8]) {
        let headers = [("content-type", "application/json")];
        if let Err(err) = host::send_response(200, &headers, response) {
            self.host_error(err);
        }
    }

    /// The buffered request body (already validated as a JSON object).
    fn buffered_body(&self) -> Option<Vec<u8>> {
        host::buffer(BufferType::HttpRequestBody, 0, self.body_size).ok()
    }

    /// Replaces the buffered request body (and its length); false if the
    /// host refused.
    pub(super) fn replace_body(&mut self, bytes: &[u8]) -> bool {
        if let Err(err) = host::set_buffer(BufferType::HttpRequestBody, 0, self.body_size, bytes) {
            self.host_error(err);
            return false;
        }
        self.body_size = bytes.len();
        let length = bytes.len().to_string();
        if let Err(err) = host::set_header(MapType::HttpRequestHeaders, "content-length", &length) {
            self.host_error(err);
        }
        true
    }
}
