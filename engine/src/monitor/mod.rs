//! Monitoring: an opt-in HTTP server that exports a running context's
//! [`StreamingStatus`](crate::StreamingStatus) — `/metrics` in the Prometheus text format,
//! `/api/status` as JSON, and `/`, a status page drawn from that JSON (like Spark's Streaming
//! tab).
//!
//! # Design
//!
//! - **Pull, not push.** The counters live where they are counted (receivers, sources, lease
//!   stores, the block store, the engine's metrics); every request builds a fresh status from
//!   them ([`exposition`] encodes it with `prometheus-client`). Nothing is copied on the hot
//!   path, and an idle endpoint costs nothing.
//! - **Owned by the context's lifecycle.** [`MonitorServer::bind`] runs before the runtime
//!   starts, so a bad address fails `start()` with [`Error::MetricsServer`](crate::Error) before
//!   anything runs; the server thread is stopped and joined by `stop()` (and when the context is
//!   dropped). No detached task: connections are tasks of a current-thread tokio runtime owned by
//!   that thread, and end with it.
//! - **Bounded.** At most [`MONITOR_MAX_CONNECTIONS`] connections are served at once (more wait in the
//!   listen backlog); a request head must arrive within [`MONITOR_HEADER_READ_TIMEOUT`].
//! - **No build step.** The page is one HTML file, one stylesheet and one script embedded with
//!   `include_str!`; its charts are inline SVG drawn by the script. Nothing is fetched from
//!   elsewhere.
//!
//! This layer sits between `runtime` (whose status it serves) and `context` (which owns it).

pub(crate) mod exposition;
mod server;

pub(crate) use server::MonitorServer;

/// Connections served at once; more wait in the listen backlog.
pub const MONITOR_MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request head.
pub const MONITOR_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
