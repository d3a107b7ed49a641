//! The relay's own HTTP endpoints: `/metrics` (Prometheus) and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

use crate::relay::metrics::RelayMetrics;

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    metrics: RelayMetrics,
}

pub async fn serve(
    listen: SocketAddr,
    registry: Registry,
    metrics: RelayMetrics,
) -> anyhow::Result<()> {
    let state = AppState {
        registry: Arc::new(registry),
        metrics,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(state);
    let listener = http_listen::bind(listen).await?;
    tracing::info!(%listen, "relay metrics and health listening");
    axum::serve(listener, app).await.context("serving /metrics")
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.refresh();
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding metrics failed".to_owned(),
        ),
    }
}

/// Healthy while NATS is connected: without it nothing the relay learns
/// reaches anyone. Engine trouble shows in metrics, not here, so an engine
/// restart does not also get the relay restarted.
async fn health_handler(State(state): State<AppState>) -> impl IntoResponse {
    if state.metrics.nats_up() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NATS disconnected\n")
    }
}
