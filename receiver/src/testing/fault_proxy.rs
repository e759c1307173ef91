//! A loopback HTTP proxy that injects AWS errors in front of an emulator.
//!
//! The SDK clients point at the proxy; it forwards each HTTP/1.1 request to the upstream emulator
//! unless the rule returns a response for it (e.g. `ProvisionedThroughputExceededException` for
//! the first three `GetRecords`). The rule sees the `X-Amz-Target` header (e.g.
//! `Kinesis_20131202.GetRecords`, `DynamoDB_20120810.PutItem`) and the body. Every connection
//! serves one request and closes (`Connection: close`), which keeps the proxy small.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the rule sees of a request.
#[derive(Debug)]
pub struct FaultRequest<'a> {
    /// The `X-Amz-Target` header (`Service_Version.Operation`), empty if absent.
    pub target: &'a str,
    /// The request body (JSON for Kinesis and `DynamoDB`).
    pub body: &'a [u8],
}

impl FaultRequest<'_> {
    /// The operation name: the part of the target after the dot (`GetRecords`).
    pub fn operation(&self) -> &str {
        self.target.rsplit('.').next().unwrap_or("")
    }
}

/// A response returned instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultResponse {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: String,
    /// The body.
    pub body: String,
}

impl FaultResponse {
    /// A Kinesis error (`application/x-amz-json-1.1`) of type `type_name`, status 400.
    pub fn kinesis_error(type_name: &str, message: &str) -> Self {
        Self {
            status: 400,
            content_type: "application/x-amz-json-1.1".into(),
            body: format!(r#"{{"__type":"{type_name}","message":"{message}"}}"#),
        }
    }

    /// `DynamoDB`'s `ProvisionedThroughputExceededException`, status 400.
    pub fn throttle_dynamodb() -> Self {
        Self {
            status: 400,
            content_type: "application/x-amz-json-1.0".into(),
            body: r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"injected by FaultProxy"}"#.into(),
        }
    }
}

type Rule = dyn Fn(&FaultRequest<'_>) -> Option<FaultResponse> + Send + Sync;

struct State {
    upstream: SocketAddr,
    rule: Box<Rule>,
    injected: AtomicU64,
    forwarded: AtomicU64,
    stop: AtomicBool,
}

/// The running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.state.upstream)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:<free port>` in front of `upstream`
    /// (`http://127.0.0.1:4567`), asking `rule` about every request.
    ///
    /// # Errors
    /// A bad upstream URL, or binding the port failed.
    pub fn start(
        upstream: &str,
        rule: impl Fn(&FaultRequest<'_>) -> Option<FaultResponse> + Send + Sync + 'static,
    ) -> io::Result<Self> {
        let host = upstream
            .strip_prefix("http://")
            .unwrap_or(upstream)
            .trim_end_matches('/');
        let upstream: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(host)?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot resolve {host}")))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            rule: Box::new(rule),
            injected: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_state = state.clone();
        std::thread::Builder::new().name("fault-proxy".into()).spawn(move || {
            for conn in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let state = accept_state.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = serve(&state, conn) {
                            tracing::debug!(error = %e, "fault proxy connection failed");
                        }
                    });
                }
            }
        })?;
        Ok(Self { addr, state })
    }

    /// The proxy's URL, to use as the client's endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Responses the rule injected.
    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::SeqCst)
    }

    /// Requests forwarded upstream.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// Reads a message head (up to the blank line) and returns it with its `Content-Length`.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<(Vec<String>, usize)>> {
    let mut lines = Vec::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return Ok(Some((lines, length)));
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        }
        lines.push(line);
    }
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        l.split_once(':')
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    })
}

/// Writes `head` (without `Connection` headers) plus `Connection: close`, then `body`.
fn write_message(out: &mut impl Write, head: &[String], body: &[u8]) -> io::Result<()> {
    let mut text = String::new();
    for line in head
        .iter()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
    {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("Connection: close\r\n\r\n");
    out.write_all(text.as_bytes())?;
    out.write_all(body)?;
    out.flush()
}

fn serve(state: &State, client: TcpStream) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    let Some((head, length)) = read_head(&mut reader)? else {
        return Ok(());
    };
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let request = FaultRequest {
        target: header(&head, "x-amz-target").unwrap_or(""),
        body: &body,
    };
    if let Some(response) = (state.rule)(&request) {
        state.injected.fetch_add(1, Ordering::SeqCst);
        let head = vec![
            format!("HTTP/1.1 {} Injected", response.status),
            format!("Content-Type: {}", response.content_type),
            format!("Content-Length: {}", response.body.len()),
        ];
        return write_message(&mut client, &head, response.body.as_bytes());
    }
    state.forwarded.fetch_add(1, Ordering::SeqCst);
    let mut upstream = TcpStream::connect(state.upstream)?;
    write_message(&mut upstream, &head, &body)?;
    let mut upstream_reader = BufReader::new(upstream);
    let Some((response_head, response_length)) = read_head(&mut upstream_reader)? else {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed"));
    };
    let chunked = header(&response_head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut response_body = Vec::new();
    if chunked {
        // Read to the end (the upstream closes after `Connection: close`) and pass it through.
        upstream_reader.read_to_end(&mut response_body)?;
    } else {
        response_body.resize(response_length, 0);
        upstream_reader.read_exact(&mut response_body)?;
    }
    write_message(&mut client, &response_head, &response_body)
}
