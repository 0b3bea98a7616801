//! The HTTP endpoint: `/metrics` for Prometheus, `/healthz` (the process answers) and
//! `/readyz` (the first full reconcile has applied: before that, the node may not yet hold
//! what the source asks for).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{error, info};

use crate::reconcile::Status;

#[derive(Debug, thiserror::Error)]
#[error("cannot serve HTTP on {address}: {reason}")]
pub struct HttpError {
    pub address: SocketAddr,
    pub reason: std::io::Error,
}

struct Shared {
    registry: Registry,
    applied: watch::Receiver<Option<Status>>,
    ready: AtomicBool,
}

/// Binds now (so a port in use is an error at start), then serves in the background.
pub async fn serve(
    address: SocketAddr,
    registry: Registry,
    applied: watch::Receiver<Option<Status>>,
) -> Result<tokio::task::JoinHandle<()>, HttpError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|reason| HttpError { address, reason })?;
    let shared = Arc::new(Shared {
        registry,
        applied,
        ready: AtomicBool::new(false),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(shared);
    info!(%address, "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            error!(%address, %err, "the HTTP endpoint stopped");
        }
    }))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match crate::metrics::encode(&shared.registry) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "cannot encode the metrics\n".to_owned(),
        ),
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    // Ready stays ready: a later failed step is retried and shows in the metrics and status,
    // and taking the pod out of its DaemonSet's rollout would not help it.
    if !shared.ready.load(Ordering::Relaxed) {
        let applied = shared
            .applied
            .borrow()
            .as_ref()
            .map(|status| status.errors.clone());
        match applied {
            Some(errors) if errors.is_empty() => shared.ready.store(true, Ordering::Relaxed),
            Some(errors) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the first reconcile failed: {}\n", errors.join("; ")),
                );
            }
            None => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the source's first complete state\n".to_owned(),
                );
            }
        }
    }
    (StatusCode::OK, "ready\n".to_owned())
}
