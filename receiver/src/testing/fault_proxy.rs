//! A loopback HTTP proxy that injects AWS errors in front of an emulator.
//!
//! The SDK clients point at the proxy; it forwards each HTTP/1.1 request to the upstream emulator
//! unless the rule returns a response for it (e.g. `ProvisionedThroughputExceededException` for
//! the first three `GetRecords`). The rule sees the `X-Amz-Target` header (e.g.
//! `Kinesis_20131202.GetRecords`, `DynamoDB_20120810.PutItem`) and the body. Every connection
//! serves one request and closes (`Connection: close`), which keeps the proxy small.
//!
//! Streaming responses — `SubscribeToShard`'s `application/vnd.amazon.eventstream` body — are
//! passed through as they arrive, message by message (the body goes to the client undelimited
//! and ends when the connection closes). A stream rule can cut such a stream after some
//! messages, as the service does when a subscription expires, or splice in recorded messages
//! built with [`event_stream_message`]: an exception in the middle of the stream, or an event
//! with `ChildShards` that an emulator never sends.

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

    /// The body as text (empty if it is not UTF-8).
    pub fn body_text(&self) -> &str {
        std::str::from_utf8(self.body).unwrap_or("")
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

/// What to do to a forwarded event-stream response (`SubscribeToShard`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFault {
    /// Pass `messages` messages through, then end the stream cleanly — what the client sees when
    /// the service ends a subscription (its 5-minute lifetime).
    EndAfter {
        /// Messages passed through first.
        messages: usize,
    },
    /// Pass `messages` messages through, then send `frames` (encoded messages, see
    /// [`event_stream_message`]) and end the stream.
    InjectAfter {
        /// Messages passed through first.
        messages: usize,
        /// What is sent instead of the rest of the stream.
        frames: Vec<u8>,
    },
    /// Pass `messages` messages through, then send nothing more while keeping the connection
    /// open until the client closes it: a silent ("zombie") subscription.
    StallAfter {
        /// Messages passed through first.
        messages: usize,
    },
}

type Rule = dyn Fn(&FaultRequest<'_>) -> Option<FaultResponse> + Send + Sync;
type StreamRule = dyn Fn(&FaultRequest<'_>) -> Option<StreamFault> + Send + Sync;

struct State {
    upstream: SocketAddr,
    rule: Box<Rule>,
    stream_rule: Box<StreamRule>,
    injected: AtomicU64,
    forwarded: AtomicU64,
    streams_cut: AtomicU64,
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
        Self::start_with_streams(upstream, rule, |_| None)
    }

    /// Like [`FaultProxy::start`]; `stream_rule` is asked about every request forwarded, and
    /// applied to its response if that is an event stream.
    ///
    /// # Errors
    /// A bad upstream URL, or binding the port failed.
    pub fn start_with_streams(
        upstream: &str,
        rule: impl Fn(&FaultRequest<'_>) -> Option<FaultResponse> + Send + Sync + 'static,
        stream_rule: impl Fn(&FaultRequest<'_>) -> Option<StreamFault> + Send + Sync + 'static,
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
            stream_rule: Box::new(stream_rule),
            injected: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            streams_cut: AtomicU64::new(0),
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

    /// Event streams the stream rule cut short (ended or spliced).
    pub fn streams_cut(&self) -> u64 {
        self.state.streams_cut.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// One event-stream message (the binary framing of `SubscribeToShard` responses): string
/// headers, a payload, and both CRC32 checksums.
///
/// An event: `[(":message-type", "event"), (":event-type", "SubscribeToShardEvent"),
/// (":content-type", "application/json")]` and the event's JSON. An error:
/// `[(":message-type", "exception"), (":exception-type", "InternalFailureException"), …]`.
///
/// # Panics
/// If a header name is longer than 255 bytes or a value longer than 65 535 bytes.
pub fn event_stream_message(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut encoded_headers = Vec::new();
    for (name, value) in headers {
        encoded_headers.push(u8::try_from(name.len()).expect("header name of at most 255 bytes"));
        encoded_headers.extend_from_slice(name.as_bytes());
        encoded_headers.push(7); // string
        encoded_headers.extend_from_slice(
            &u16::try_from(value.len())
                .expect("header value of at most 65535 bytes")
                .to_be_bytes(),
        );
        encoded_headers.extend_from_slice(value.as_bytes());
    }
    let total = 12 + encoded_headers.len() + payload.len() + 4;
    let mut message = Vec::with_capacity(total);
    message.extend_from_slice(&(total as u32).to_be_bytes());
    message.extend_from_slice(&(encoded_headers.len() as u32).to_be_bytes());
    let prelude_crc = crc32(&message);
    message.extend_from_slice(&prelude_crc.to_be_bytes());
    message.extend_from_slice(&encoded_headers);
    message.extend_from_slice(payload);
    let message_crc = crc32(&message);
    message.extend_from_slice(&message_crc.to_be_bytes());
    message
}

/// CRC-32 (IEEE 802.3), as event-stream framing uses it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
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
    let stream_fault = (state.stream_rule)(&request);
    state.forwarded.fetch_add(1, Ordering::SeqCst);
    let mut upstream = TcpStream::connect(state.upstream)?;
    write_message(&mut upstream, &head, &body)?;
    let mut upstream_reader = BufReader::new(upstream);
    let Some((response_head, response_length)) = read_head(&mut upstream_reader)? else {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed"));
    };
    let chunked = header(&response_head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let event_stream = header(&response_head, "content-type").is_some_and(|v| v.contains("vnd.amazon.eventstream"));
    if event_stream {
        // Undelimited: the body ends when the connection closes.
        let head: Vec<String> = response_head
            .into_iter()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                !l.starts_with("transfer-encoding:") && !l.starts_with("content-length:")
            })
            .collect();
        write_message(&mut client, &head, &[])?;
        let mut body: Box<dyn Read> = if chunked {
            Box::new(Dechunked::new(upstream_reader))
        } else {
            Box::new(upstream_reader.take(response_length as u64))
        };
        return relay_event_stream(state, &mut body, &mut client, stream_fault);
    }
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

/// Copies event-stream messages from `upstream` to `client` as they complete, applying `fault`.
fn relay_event_stream(
    state: &State,
    upstream: &mut dyn Read,
    client: &mut TcpStream,
    fault: Option<StreamFault>,
) -> io::Result<()> {
    let (limit, frames, stall) = match fault {
        None => (usize::MAX, None, false),
        Some(StreamFault::EndAfter { messages }) => (messages, None, false),
        Some(StreamFault::InjectAfter { messages, frames }) => (messages, Some(frames), false),
        Some(StreamFault::StallAfter { messages }) => (messages, None, true),
    };
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut passed = 0;
    while passed < limit {
        // Forward every complete message in the buffer.
        while passed < limit && buffer.len() >= 4 {
            let total = u32::from_be_bytes(buffer[..4].try_into().expect("4 bytes")) as usize;
            if total < 16 || buffer.len() < total {
                break;
            }
            client.write_all(&buffer[..total])?;
            client.flush()?;
            buffer.drain(..total);
            passed += 1;
        }
        if passed >= limit {
            break;
        }
        let n = upstream.read(&mut chunk)?;
        if n == 0 {
            return Ok(()); // the upstream ended the stream
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    state.streams_cut.fetch_add(1, Ordering::SeqCst);
    if stall {
        // The client sends nothing after its request: this returns when it closes the socket.
        let mut byte = [0u8; 1];
        while client.read(&mut byte)? > 0 {}
        return Ok(());
    }
    if let Some(frames) = frames {
        client.write_all(&frames)?;
    }
    client.flush()?;
    client.shutdown(std::net::Shutdown::Both)
}

/// The body of a `Transfer-Encoding: chunked` response, as it arrives.
struct Dechunked<R> {
    inner: R,
    /// Bytes left in the current chunk; `None` before the first chunk's size line.
    left: Option<usize>,
    done: bool,
}

impl<R: BufRead> Dechunked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            left: None,
            done: false,
        }
    }
}

impl<R: BufRead> Read for Dechunked<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            match self.left {
                Some(left) if left > 0 => {
                    let want = left.min(out.len());
                    let n = self.inner.read(&mut out[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk cut short"));
                    }
                    self.left = Some(left - n);
                    return Ok(n);
                }
                Some(_) => {
                    // The CRLF after a chunk's data.
                    let mut crlf = String::new();
                    self.inner.read_line(&mut crlf)?;
                    self.left = None;
                }
                None => {
                    let mut line = String::new();
                    if self.inner.read_line(&mut line)? == 0 {
                        self.done = true;
                        return Ok(0);
                    }
                    let size = line.trim().split(';').next().unwrap_or("");
                    let size = usize::from_str_radix(size, 16)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        self.done = true;
                        return Ok(0);
                    }
                    self.left = Some(size);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn an_event_stream_message_carries_its_length_and_checksums() {
        let message = event_stream_message(&[(":message-type", "event")], b"{}");
        let total = u32::from_be_bytes(message[..4].try_into().unwrap()) as usize;
        assert_eq!(total, message.len());
        let prelude_crc = u32::from_be_bytes(message[8..12].try_into().unwrap());
        assert_eq!(prelude_crc, crc32(&message[..8]));
        let message_crc = u32::from_be_bytes(message[total - 4..].try_into().unwrap());
        assert_eq!(message_crc, crc32(&message[..total - 4]));
    }

    #[test]
    fn dechunked_reads_the_body_across_chunks() {
        let raw = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let mut body = String::new();
        Dechunked::new(&raw[..]).read_to_string(&mut body).unwrap();
        assert_eq!(body, "hello world");
    }
}
