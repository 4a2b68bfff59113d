//! A fault-injecting HTTP proxy on loopback, between diskkit and an S3 server. Each request is
//! read whole, then forwarded untouched or met with a fault: the connection dropped before any
//! reply, a reply stalled past the client's read timeout, a 500 or a 503 SlowDown, a reply cut
//! short with a clean close or with a reset. Which requests get which fault follows from their
//! numbers alone ([`Plan`]), so every kind of fault is sure to happen in a test. Every connection
//! carries one request (`Connection: close` is added upstream), so a fault never leaks into the
//! next request. Nothing is reordered.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The connection closes before a reply.
    Drop,
    /// No reply for [`Plan::stall`], then the connection closes.
    Stall,
    /// `500 InternalError`.
    InternalError,
    /// `503 SlowDown`, S3's throttling reply.
    SlowDown,
    /// The upstream reply, cut in the middle, then a clean close.
    Truncate,
    /// The upstream reply, cut in the middle, then a reset (RST).
    Reset,
}

pub const ALL_FAULTS: [Fault; 6] = [
    Fault::Drop,
    Fault::Stall,
    Fault::InternalError,
    Fault::SlowDown,
    Fault::Truncate,
    Fault::Reset,
];

/// What the proxy does to requests, by their numbers (from 1, counted over the proxy's life):
/// every `every`-th request gets the next fault of `faults` in turn, and every request
/// numbered in `outage` gets one (an outage long enough to exhaust a client's retries).
pub struct Plan {
    pub every: u64,
    pub outage: Range<u64>,
    pub faults: Vec<Fault>,
    /// How long [`Fault::Stall`] waits (longer than the client's read timeout).
    pub stall: Duration,
}

struct Shared {
    upstream: SocketAddr,
    plan: Mutex<Plan>,
    requests: AtomicU64,
    stop: AtomicBool,
    /// Requests seen, and faults injected by kind.
    counts: Mutex<BTreeMap<String, u64>>,
}

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// Bytes of request headers or of a reply the proxy holds at most.
const MAX_HEADERS: usize = 64 << 10;
const MAX_BODY: usize = 128 << 20;

impl FaultProxy {
    /// A proxy to the server at `upstream` (`http://host:port`).
    pub fn start(upstream: &str, plan: Plan) -> FaultProxy {
        let hostport = upstream.trim_start_matches("http://").trim_end_matches('/');
        let upstream: SocketAddr = hostport.parse().expect("upstream host:port");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new(plan),
            requests: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            counts: Mutex::new(BTreeMap::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                while !shared.stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let shared = shared.clone();
                            std::thread::spawn(move || serve(&shared, client));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The endpoint to give diskkit.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what the proxy does from the next request on.
    pub fn set_plan(&self, plan: Plan) {
        *self.shared.plan.lock().unwrap() = plan;
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Requests seen (`requests`) and faults injected (by their `Debug` names).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.shared.counts.lock().unwrap().clone()
    }

    /// Faults injected in all.
    pub fn faults_injected(&self) -> u64 {
        self.counts()
            .iter()
            .filter(|(k, _)| *k != "requests")
            .map(|(_, v)| v)
            .sum()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            a.join().ok();
        }
    }
}

/// The fault for request number `n`, if any, and the plan's stall.
fn fault_for(shared: &Shared, n: u64) -> (Option<Fault>, Duration) {
    let plan = shared.plan.lock().unwrap();
    let turn = if plan.outage.contains(&n) {
        Some(n)
    } else if plan.every > 0 && n.is_multiple_of(plan.every) {
        Some(n / plan.every)
    } else {
        None
    };
    let fault = turn
        .filter(|_| !plan.faults.is_empty())
        .map(|t| plan.faults[t as usize % plan.faults.len()]);
    (fault, plan.stall)
}

fn count(shared: &Shared, what: &str) {
    *shared
        .counts
        .lock()
        .unwrap()
        .entry(what.to_string())
        .or_default() += 1;
}

/// Handles the one request of a client connection.
fn serve(shared: &Shared, mut client: TcpStream) {
    client.set_nonblocking(false).ok();
    client.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let Some(request) = read_request(&mut client) else {
        return;
    };
    count(shared, "requests");
    let n = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let (fault, stall) = fault_for(shared, n);
    if let Some(f) = fault {
        count(shared, &format!("{f:?}"));
    }
    match fault {
        Some(Fault::Drop) => {}
        Some(Fault::Stall) => std::thread::sleep(stall),
        Some(Fault::InternalError) => reply_error(&mut client, 500, "InternalError"),
        Some(Fault::SlowDown) => reply_error(&mut client, 503, "SlowDown"),
        None | Some(Fault::Truncate) | Some(Fault::Reset) => {
            let Some(reply) = forward(shared.upstream, &request) else {
                return;
            };
            match fault {
                None => {
                    client.write_all(&reply).ok();
                }
                _ => {
                    // Past the headers, into the body where there is one.
                    let cut = reply.len() / 2 + 1;
                    client.write_all(&reply[..cut.min(reply.len())]).ok();
                    if fault == Some(Fault::Reset) {
                        reset(&client);
                    }
                }
            }
        }
    }
    client.shutdown(Shutdown::Both).ok();
}

/// Makes the close of `stream` a reset (RST) instead of a clean FIN.
fn reset(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a properly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// One whole request (headers with `Connection: close`, and its `Content-Length` body), or
/// `None` when the client went away.
fn read_request(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(buf.len() < MAX_HEADERS, "request headers too large");
        let n = client.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut length = 0usize;
    let mut lines = Vec::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        assert!(
            !lower.starts_with("transfer-encoding:"),
            "the fault proxy handles Content-Length bodies only: {line}"
        );
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().expect("Content-Length");
            assert!(length <= MAX_BODY, "request body too large");
        }
        if !lower.starts_with("connection:") {
            lines.push(line.to_string());
        }
    }
    let mut body = buf[end..].to_vec();
    while body.len() < length {
        let n = client.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let mut out = lines.join("\r\n").into_bytes();
    out.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    out.extend_from_slice(&body);
    Some(out)
}

/// The upstream's whole reply to `request`, or `None` when it could not be had.
fn forward(upstream: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    let mut server = TcpStream::connect(upstream).ok()?;
    server.set_read_timeout(Some(Duration::from_secs(60))).ok();
    server.write_all(request).ok()?;
    let mut reply = Vec::new();
    server
        .take(MAX_BODY as u64 + MAX_HEADERS as u64)
        .read_to_end(&mut reply)
        .ok()?;
    Some(reply)
}

fn reply_error(client: &mut TcpStream, status: u16, code: &str) {
    let reason = if status == 503 {
        "Service Unavailable"
    } else {
        "Internal Server Error"
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected by the test proxy</Message></Error>"
    );
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(reply.as_bytes()).ok();
}
