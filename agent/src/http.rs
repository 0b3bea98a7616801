//! The HTTP endpoint: `/metrics` for Prometheus, `/healthz` (the process answers) and
//! `/readyz` (the first full reconcile has applied: before that, the node may not yet hold
//! what the source asks for; and no configured part is off).
//!
//! The agent runs on one thread, which also heals the node: a scrape must never hold it. A
//! scrape of 10,000 addresses is megabytes of text, so it is encoded on a blocking thread,
//! one encoding at a time, and scrapes that arrive meanwhile share the next one.
//!
//! The endpoint has no authentication, so what a client can hold is bounded: at most
//! [`MAX_CONNECTIONS`] at once (more wait to be accepted), a request header must arrive
//! within [`HEADER_TIMEOUT`], and no connection lasts longer than [`CONNECTION_TIMEOUT`].

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::sync::{Mutex, Semaphore, watch};
use tracing::{info, warn};

use crate::reconcile::Status;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// A client that has not sent a whole request header by then (from connecting, or from its
/// previous response) is disconnected.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lasts longer, however busy: a scrape of 10,000 addresses takes under a second.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[error("cannot serve HTTP on {address}: {reason}")]
pub struct HttpError {
    pub address: SocketAddr,
    pub reason: std::io::Error,
}

struct Shared {
    scrapes: Scrapes,
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
        scrapes: Scrapes::new(registry),
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
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = connections.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(%address, %err, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // Whatever the outcome, the connection is over: a client that hung up or
                // timed out is not the agent's error.
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
                drop(permit);
            });
        }
    }))
}

/// The registry's encodings: one at a time, off the async thread.
struct Scrapes {
    registry: Arc<Registry>,
    /// The last encoding; its lock is held for as long as an encoding runs.
    latest: Arc<Mutex<Option<Encoding>>>,
}

struct Encoding {
    started: Instant,
    body: Result<Bytes, std::fmt::Error>,
}

impl Scrapes {
    fn new(registry: Registry) -> Self {
        Self {
            registry: Arc::new(registry),
            latest: Arc::new(Mutex::new(None)),
        }
    }

    /// The metrics as of a moment after this call: an encoding started after it, shared by
    /// every scrape that waited for it.
    async fn body(&self) -> Result<Bytes, std::fmt::Error> {
        let asked = Instant::now();
        let mut latest = self.latest.clone().lock_owned().await;
        if let Some(encoding) = latest.as_ref().filter(|e| e.started >= asked) {
            return encoding.body.clone();
        }
        let registry = self.registry.clone();
        // The lock goes with the encoding, so that a scraper that hangs up does not let a
        // second encoding start beside the first.
        let encoded = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let body = crate::metrics::encode(&registry).map(Bytes::from);
            *latest = Some(Encoding {
                started,
                body: body.clone(),
            });
            body
        })
        .await;
        encoded.unwrap_or(Err(std::fmt::Error))
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.scrapes.body().await {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            Bytes::from_static(b"cannot encode the metrics\n"),
        ),
    }
}
async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    // A configured part that is off (a dataplane whose maps another agent holds, a routing
    // state directory that cannot be made) is not a passing failure: the node does not do
    // what its config says until it is back.
    let off = shared
        .applied
        .borrow()
        .as_ref()
        .map(|status| status.off.clone())
        .unwrap_or_default();
    if !off.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", off.join("; ")),
        );
    }
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
