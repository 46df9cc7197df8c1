//! The API's connections: accepting, bounding, timing out and shutting down (SPEC §5, §7 "the
//! daemon under slow clients"). hyper serves each connection (HTTP/1.1); this module decides
//! which connections live:
//!
//! - at most `API_CONNECTIONS_MAX` are open; at the cap a new connection closes the one that
//!   has no request in a handler and moved no byte for the longest, so a fresh `/progress`
//!   poll is always served, whatever a local process holds open, and the daemon never reaches
//!   its fd limit (an `accept` that fails with EMFILE closes one too);
//! - a request head must arrive within `API_HEADER_READ_TIMEOUT_MS` of the connection waiting
//!   for it (hyper's header timer, which also ends idle keep-alive connections); a body within
//!   `API_BODY_READ_TIMEOUT_MS` (`api.rs`); a connection stalled writing its answer is closed
//!   after `API_STALL_TIMEOUT_MS`; a head is at most `API_HEADER_BYTES_MAX`;
//! - at SIGTERM, connections without a request in a handler close at once, the others get
//!   `API_SHUTDOWN_GRACE_MS` to finish;
//! - every request passes `guard::Policy::admit` before the router sees it.

use super::guard::{PeerUid, Policy, Refusal};
use crate::limits::{
    API_CONNECTIONS_MAX, API_HEADER_BYTES_MAX, API_HEADER_READ_TIMEOUT_MS, API_HEADERS_MAX,
    API_SHUTDOWN_GRACE_MS, API_STALL_TIMEOUT_MS,
};
use axum::body::Body;
use http::{Request, Response};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower_service::Service;

/// One open connection, as the table sees it.
struct Entry {
    /// Milliseconds since the table's epoch when a byte last moved.
    last_io_ms: Arc<AtomicU64>,
    /// Requests of this connection inside a handler.
    in_handler: Arc<AtomicUsize>,
    /// Closes the connection (dropping it closes the socket).
    close: Arc<Notify>,
}

impl Entry {
    fn idle_for(&self, now_ms: u64) -> Option<u64> {
        (self.in_handler.load(Ordering::SeqCst) == 0)
            .then(|| now_ms.saturating_sub(self.last_io_ms.load(Ordering::Relaxed)))
    }
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
}

/// The open connections, shared by the accept loop, the sweeper and the connection tasks.
struct Conns {
    epoch: Instant,
    /// The connections that may still be chosen to close (an entry leaves when it is told to).
    table: Mutex<Table>,
    /// Sockets open: accepted and whose task has not ended. A closed entry's socket stays
    /// open until its task runs again, so this, not the table, is what the cap bounds.
    live: AtomicUsize,
    /// Signalled whenever a connection's task ends (its socket is closed).
    closed: Notify,
}

impl Conns {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the connection idle the longest (one in a handler only if none is idle).
    /// Returns whether one was closed.
    fn close_oldest_idle(&self) -> bool {
        let now = self.now_ms();
        let mut t = self.lock();
        let victim = t
            .open
            .iter()
            .max_by_key(|(_, e)| match e.idle_for(now) {
                Some(idle) => (1, idle),
                None => (0, now.saturating_sub(e.last_io_ms.load(Ordering::Relaxed))),
            })
            .map(|(id, _)| *id);
        match victim.and_then(|id| t.open.remove(&id)) {
            Some(e) => {
                e.close.notify_one();
                true
            }
            None => false,
        }
    }

    /// Closes every connection without a request in a handler that moved no byte for `ms`.
    fn close_idle_for(&self, ms: u64) -> usize {
        let now = self.now_ms();
        let mut t = self.lock();
        let stale: Vec<u64> = t
            .open
            .iter()
            .filter(|(_, e)| e.idle_for(now).is_some_and(|i| i >= ms))
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            if let Some(e) = t.open.remove(id) {
                e.close.notify_one();
            }
        }
        stale.len()
    }

    /// Registers a new connection (in the accept loop, so the cap counts it at once).
    fn add(&self) -> Slot {
        let e = Entry {
            last_io_ms: Arc::new(AtomicU64::new(self.now_ms())),
            in_handler: Arc::new(AtomicUsize::new(0)),
            close: Arc::new(Notify::new()),
        };
        let (last_io_ms, in_handler, close) =
            (e.last_io_ms.clone(), e.in_handler.clone(), e.close.clone());
        let mut t = self.lock();
        let id = t.next_id;
        t.next_id += 1;
        t.open.insert(id, e);
        self.live.fetch_add(1, Ordering::SeqCst);
        Slot { id, last_io_ms, in_handler, close }
    }

    /// A connection's task ends: its socket is closed.
    fn finished(&self, id: u64) {
        self.lock().open.remove(&id);
        self.live.fetch_sub(1, Ordering::SeqCst);
        self.closed.notify_waiters();
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Waits until fewer than `n` sockets are open, closing the connection idle the longest
    /// each time none has closed meanwhile.
    async fn below(&self, n: usize) {
        loop {
            let closed = self.closed.notified();
            if self.live() < n {
                return;
            }
            self.close_oldest_idle();
            closed.await;
        }
    }
}

/// A socket that notes when a byte last moved.
struct Tracked {
    inner: TcpStream,
    last_io_ms: Arc<AtomicU64>,
    conns: Arc<Conns>,
}

impl Tracked {
    fn touch(&self) {
        self.last_io_ms.store(self.conns.now_ms(), Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What every request of one connection shares.
struct ConnCtx {
    router: axum::Router,
    policy: Arc<Policy>,
    peer: SocketAddr,
    ours: SocketAddr,
    /// Looked up at the first request that needs it (a stalled connection costs no lookup).
    peer_uid: OnceLock<PeerUid>,
    in_handler: Arc<AtomicUsize>,
}

impl ConnCtx {
    fn peer_uid(&self) -> PeerUid {
        if !self.policy.checks_uids() {
            return PeerUid::NotChecked;
        }
        *self.peer_uid.get_or_init(|| super::peer::uid_of(self.peer, self.ours))
    }
}

/// Counts a request as inside a handler while alive.
struct InHandler(Arc<AtomicUsize>);

impl InHandler {
    fn enter(n: &Arc<AtomicUsize>) -> InHandler {
        n.fetch_add(1, Ordering::SeqCst);
        InHandler(n.clone())
    }
}

impl Drop for InHandler {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The answer to a refused request: the legacy envelope (HTTP 200, as for every answer of the
/// contract; `code` 400, the legacy contract's code for a refused request), and the connection
/// closed.
fn refused(r: &Refusal) -> Response<Body> {
    let code = crate::error::ErrorCode::RequestRefused;
    let msg = format!("{code}: {}", r.message());
    let body = serde_json::json!({ "code": super::api::http_code(code), "msg": msg }).to_string();
    let mut resp = Response::new(Body::from(body));
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    h.insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    resp
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<Body>, Infallible> {
    let _in = InHandler::enter(&ctx.in_handler);
    if let Err(r) = ctx.policy.admit(req.method(), req.uri(), req.headers(), ctx.peer_uid()) {
        // The refused header and value only: the body is never read, and never logged.
        tracing::warn!(
            peer = %ctx.peer,
            method = %req.method(),
            path = req.uri().path(),
            header = r.header(),
            value = %r.value(),
            "request refused"
        );
        return Ok(refused(&r));
    }
    let mut router = ctx.router.clone();
    router.call(req.map(Body::new)).await
}

/// The table's handles of one connection.
struct Slot {
    id: u64,
    last_io_ms: Arc<AtomicU64>,
    in_handler: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    conns: Arc<Conns>,
    router: axum::Router,
    policy: Arc<Policy>,
    mut stop: watch::Receiver<bool>,
) {
    let Slot { id, last_io_ms, in_handler, close } = slot;
    let Ok(ours) = stream.local_addr() else {
        drop(stream);
        conns.finished(id);
        return;
    };
    let ctx = Arc::new(ConnCtx {
        router,
        policy,
        peer,
        ours,
        peer_uid: OnceLock::new(),
        in_handler: in_handler.clone(),
    });
    let io =
        hyper_util::rt::TokioIo::new(Tracked { inner: stream, last_io_ms, conns: conns.clone() });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(API_HEADER_READ_TIMEOUT_MS))
        .max_buf_size(API_HEADER_BYTES_MAX)
        .max_headers(API_HEADERS_MAX)
        .keep_alive(true);
    // Boxed, so that it (and its socket) can be dropped before the slot is given back.
    let mut conn = Box::pin(
        http.serve_connection(io, hyper::service::service_fn(move |req| handle(req, ctx.clone()))),
    );
    tokio::select! {
        _ = conn.as_mut() => {}
        () = close.notified() => {}
        _ = stop.changed() => {
            if in_handler.load(Ordering::SeqCst) > 0 {
                // A request is being handled: let it answer, then close.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = close.notified() => {}
                }
            }
        }
    }
    drop(conn);
    conns.finished(id);
}

/// Accepts and serves until `shutdown` resolves, then closes idle connections at once and
/// gives requests in handlers `API_SHUTDOWN_GRACE_MS`.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    policy: Policy,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let conns = Arc::new(Conns {
        epoch: Instant::now(),
        table: Mutex::new(Table::default()),
        live: AtomicUsize::new(0),
        closed: Notify::new(),
    });
    let policy = Arc::new(policy);
    let (stop_tx, stop_rx) = watch::channel(false);
    let sweeper = tokio::spawn(sweep(conns.clone()));
    tokio::pin!(shutdown);
    loop {
        // At the cap, a socket must really be closed before the next is accepted: the fd
        // count stays bounded however fast connections arrive (the backlog waits meanwhile).
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = async {
                conns.below(API_CONNECTIONS_MAX).await;
                listener.accept().await
            } => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let slot = conns.add();
                tokio::spawn(serve_conn(
                    stream,
                    peer,
                    slot,
                    conns.clone(),
                    router.clone(),
                    policy.clone(),
                    stop_rx.clone(),
                ));
            }
            Err(e) => {
                // EMFILE/ENFILE (or a transient error): free a descriptor and pause briefly,
                // instead of spinning on a listener that stays readable.
                let freed = conns.close_oldest_idle();
                tracing::warn!(error = %e, freed, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);
    sweeper.abort();
    let _ = stop_tx.send(true);
    if tokio::time::timeout(Duration::from_millis(API_SHUTDOWN_GRACE_MS), all_closed(&conns))
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.live(),
            "requests still in handlers after the shutdown grace; closing them"
        );
    }
}

/// Closes connections stalled for `API_STALL_TIMEOUT_MS`, checking four times per timeout.
async fn sweep(conns: Arc<Conns>) {
    let mut tick = tokio::time::interval(Duration::from_millis(API_STALL_TIMEOUT_MS / 4));
    loop {
        tick.tick().await;
        let n = conns.close_idle_for(API_STALL_TIMEOUT_MS);
        if n > 0 {
            tracing::debug!(closed = n, "closed stalled API connections");
        }
    }
}

/// Resolves when no connection is left open.
async fn all_closed(conns: &Conns) {
    loop {
        let closed = conns.closed.notified();
        if conns.live() == 0 {
            return;
        }
        closed.await;
    }
}
