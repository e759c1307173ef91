//! The HTTP server: hyper 1 (HTTP/1.1 only) on a current-thread tokio runtime owned by one
//! thread, and the routes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;

use super::{MONITOR_HEADER_READ_TIMEOUT, MONITOR_MAX_CONNECTIONS, exposition};
use crate::runtime::status::StreamingStatus;
use crate::{Error, Result};

/// Builds the status a request serves.
pub(crate) type StatusFn = Arc<dyn Fn() -> StreamingStatus + Send + Sync>;

const INDEX_HTML: &str = include_str!("status_page/index.html");
const STATUS_CSS: &str = include_str!("status_page/status.css");
const STATUS_JS: &str = include_str!("status_page/status.js");

/// A listening socket, not yet served: binding comes first so that a bad address fails before
/// the runtime starts.
pub(crate) struct BoundMonitor {
    listener: std::net::TcpListener,
    configured: SocketAddr,
    local: SocketAddr,
}

/// The running server; [`stop`](Self::stop) ends it (dropping it does too).
pub(crate) struct MonitorServer {
    local: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MonitorServer {
    /// Listens on `addr`.
    ///
    /// # Errors
    /// [`Error::MetricsServer`] naming the address and the fix (in use, not local, not allowed).
    pub(crate) fn bind(addr: SocketAddr) -> Result<BoundMonitor> {
        let error = |source| Error::MetricsServer { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(error)?;
        listener.set_nonblocking(true).map_err(error)?;
        let local = listener.local_addr().map_err(error)?;
        Ok(BoundMonitor {
            listener,
            configured: addr,
            local,
        })
    }

    /// The address it listens on (the bound port when the configured one was 0).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting, ends open connections and joins the server thread.
    pub(crate) fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // An error means the thread already ended; joining below is all that is left.
            let _ended = shutdown.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the monitoring server thread panicked");
        }
    }
}

impl Drop for MonitorServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl BoundMonitor {
    /// Serves `status` on its own thread until stopped.
    ///
    /// # Errors
    /// [`Error::MetricsServer`] if the tokio runtime or the thread cannot be created.
    pub(crate) fn serve(self, status: StatusFn) -> Result<MonitorServer> {
        let addr = self.configured;
        let error = |source| Error::MetricsServer { addr, source };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(error)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(self.listener).map_err(error)?
        };
        let (shutdown, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("sluice-monitor".into())
            .spawn(move || runtime.block_on(accept_loop(listener, status, stopped)))
            .map_err(error)?;
        tracing::info!(addr = %self.local, "serving metrics on /metrics and the status page on /");
        Ok(MonitorServer {
            local: self.local,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }
}

/// Accepts connections (at most [`MONITOR_MAX_CONNECTIONS`] at once) until `stopped` fires, then aborts
/// the open ones.
async fn accept_loop(listener: tokio::net::TcpListener, status: StatusFn, mut stopped: oneshot::Receiver<()>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept(), if connections.len() < MONITOR_MAX_CONNECTIONS => match accepted {
                Ok((stream, _peer)) => {
                    let status = status.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| {
                            let response = respond(&request, &status);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let served = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(MONITOR_HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "a monitoring connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, typically: wait a little instead of spinning.
                    tracing::warn!(error = %e, "the monitoring server could not accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
    connections.shutdown().await;
}

/// Routes one request.
fn respond(request: &Request<Incoming>, status: &StatusFn) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD are served\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/" | "/index.html" => text(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML.into()),
        "/status.css" => text(StatusCode::OK, "text/css; charset=utf-8", STATUS_CSS.into()),
        "/status.js" => text(StatusCode::OK, "text/javascript; charset=utf-8", STATUS_JS.into()),
        "/metrics" => text(
            StatusCode::OK,
            exposition::CONTENT_TYPE,
            exposition::encode(status()).into(),
        ),
        "/api/status" => match serde_json::to_vec(&status()) {
            Ok(json) => text(StatusCode::OK, "application/json", json.into()),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("cannot encode the status: {e}\n").into(),
            ),
        },
        other => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("{other} is not served; try / (status page), /metrics (Prometheus) or /api/status (JSON)\n").into(),
        ),
    }
}

fn text(code: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Every answer is the state of the moment.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
