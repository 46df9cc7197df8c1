//! The daemon's API under slow and hostile local clients (SPEC §5, §7 "the daemon under slow
//! clients"; `src/daemon/conns.rs`, `src/limits.rs`): `tope-updater serve` as a real process,
//! driven over real loopback TCP by raw sockets that stall where a real client would not, and by
//! the same HTTP client the other daemon tests use. What this file proves:
//!
//! - a local process holding more stalled connections than the daemon has file descriptors
//!   (1100 half-sent request heads against `LimitNOFILE=1024`) locks out neither `/progress`
//!   nor SIGTERM, and the daemon's descriptors and memory stay bounded meanwhile;
//! - a request head that stops half-way, and an idle keep-alive connection, are closed by the
//!   header timer (`API_HEADER_READ_TIMEOUT_MS`): not before it, and before the stall sweeper
//!   (`API_STALL_TIMEOUT_MS`) could have done it;
//! - a body trickled slower than `API_BODY_READ_TIMEOUT_MS` is refused in the contract's
//!   envelope (`code 400`, `VALIDATION_ERROR`) and starts nothing;
//! - a device-api that accepts the report connection and never answers holds up neither the
//!   download, the install nor `/progress` (reports go out on their own thread).
//!
//! Times measured here are hang detectors and lower bounds of the daemon's timers, never
//! sleeps standing in for an event: every wait polls with a deadline.
//!
//! Run with `cargo test --features failpoints --test it api_load`.

use crate::daemon::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tope_updater::limits::{
    API_BODY_READ_TIMEOUT_MS, API_CONNECTIONS_MAX, API_HEADER_READ_TIMEOUT_MS, API_STALL_TIMEOUT_MS,
};
use tope_updater::reporter::REPORT_TIMEOUT_MS;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The header timer's period, less a margin for clock granularity: a connection the header
/// timer closes is never closed sooner.
const HEADER_TIMEOUT_FLOOR: Duration = ms(API_HEADER_READ_TIMEOUT_MS - 500);
/// The sweeper closes a silent connection no sooner than this, so a close before it is the
/// header timer's doing.
const STALL_TIMEOUT: Duration = ms(API_STALL_TIMEOUT_MS);
/// The body timer's period, less a margin.
const BODY_TIMEOUT_FLOOR: Duration = ms(API_BODY_READ_TIMEOUT_MS - 1_000);
/// Descriptors the daemon may hold besides its connections (it holds 15 when idle).
const FDS_BESIDES_CONNECTIONS: usize = 64;
/// One POST to device-api, connect to answer.
const REPORT_TIMEOUT: Duration = ms(REPORT_TIMEOUT_MS);
/// A hang detector for one request or one wait: generous on a loaded 2-core machine, far
/// below "never".
const HANG: Duration = Duration::from_secs(30);

const HALF_HEAD: &[u8] = b"GET /api/v1.0/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n";
const FULL_HEAD: &[u8] = b"GET /api/v1.0/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

// ---------------------------------------------------------------- raw clients

fn addr_of(d: &Daemon) -> SocketAddr {
    d.base
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("daemon base {:?}", d.base))
}

fn connect(addr: SocketAddr) -> TcpStream {
    // Fails only when the daemon stopped accepting and its listen backlog is full.
    let s = TcpStream::connect_timeout(&addr, HANG)
        .unwrap_or_else(|e| panic!("connect to the daemon at {addr}: {e} (not accepting?)"));
    s.set_nodelay(true).unwrap();
    s
}

/// A connection that sent half a request head (no blank line) and goes silent.
fn stalled(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(HALF_HEAD).unwrap_or_else(|e| panic!("sending half a head to {addr}: {e}"));
    s
}

/// How a raw read ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// `complete` accepted the bytes read.
    Complete,
    /// The daemon closed the connection: a read returned 0 or failed.
    Closed,
}

/// Reads from `s` into `buf` until `complete(buf)` or the daemon closes the connection; panics
/// if neither happens within `limit` of `since`. `meanwhile` runs whenever no byte came for
/// 100 ms (checks that the daemon keeps serving others meanwhile).
fn read_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    since: Instant,
    limit: Duration,
    what: &str,
    complete: impl Fn(&[u8]) -> bool,
    mut meanwhile: impl FnMut(),
) -> Ended {
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut tmp = [0u8; 4096];
    loop {
        match s.read(&mut tmp) {
            Ok(0) => return Ended::Closed,
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                if complete(buf) {
                    return Ended::Complete;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                assert!(
                    since.elapsed() < limit,
                    "{what}: nothing after {:?} (limit {limit:?}); read so far: {:?}",
                    since.elapsed(),
                    String::from_utf8_lossy(buf)
                );
                meanwhile();
            }
            Err(_) => return Ended::Closed,
        }
    }
}

/// One HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
struct Answer {
    status_line: String,
    /// Names lowercased.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {self:?}"))
    }
}

/// The first response in `buf`, once all of it is there (the daemon's answers carry a
/// `Content-Length`).
fn answer_in(buf: &[u8]) -> Option<Answer> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?.to_string();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let body = buf.get(end + 4..end + 4 + len)?.to_vec();
    Some(Answer { status_line, headers, body })
}

/// `/progress` answers, and the daemon is idle.
fn assert_idle(d: &Daemon, ctx: &str) {
    let p = d.progress();
    assert_eq!((p.code, p.stage.as_str()), (200, "idle"), "{ctx}: {p:?}");
}

// ---------------------------------------------------------------- the daemon as /proc sees it

fn fds(pid: i32) -> Vec<String> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"));
    dir.filter_map(std::result::Result::ok)
        .map(|e| std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default())
        .collect()
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(std::iter::Iterator::count)
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

fn sockets(pid: i32) -> usize {
    fds(pid).iter().filter(|t| t.starts_with("socket:")).count()
}

/// A `kB` field of `/proc/PID/status` (`VmHWM`, `VmRSS`), in bytes.
fn status_kb(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in:\n{text}"));
    let kb: u64 = line
        .trim()
        .strip_suffix("kB")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field}: {line:?}"));
    kb * 1024
}

/// `(soft, hard)` "Max open files" of a process (`self` or a pid).
fn nofile(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("/proc/{pid}/limits:\n{text}"));
    let words: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    let n = |w: &str| {
        if w == "unlimited" { u64::MAX } else { w.parse().unwrap_or_else(|_| panic!("{line:?}")) }
    };
    (n(words[0]), n(words[1]))
}

/// Raises this test process's soft `RLIMIT_NOFILE` to its hard limit, which must be at least
/// `need`. (Through prlimit(1) on our own pid: the crate's nix lacks its `resource` feature.)
fn raise_own_nofile(need: u64) {
    let (soft, hard) = nofile("self");
    assert!(
        hard >= need,
        "this test opens about {need} sockets at once, but the hard RLIMIT_NOFILE of the test \
         process is {hard}: run it where `ulimit -Hn` is at least {need}"
    );
    if soft >= need {
        return;
    }
    let limit = if hard == u64::MAX { "unlimited".to_string() } else { hard.to_string() };
    let out = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .unwrap_or_else(|e| panic!("running prlimit: {e}"));
    assert!(
        out.status.success(),
        "prlimit --pid self --nofile={limit}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (soft, _) = nofile("self");
    assert!(soft >= need, "soft RLIMIT_NOFILE still {soft} after prlimit");
}

// ---------------------------------------------------- 1. more stalled connections than descriptors

#[test]
fn stalled_connections_beyond_the_fd_limit_do_not_lock_out_progress() {
    const STALLED: usize = 1100;
    const AT_SIGTERM: usize = 100;
    raise_own_nofile(1300);
    let rig = Rig::new();
    let d = Daemon::start_wrapped(&rig.env, None, &["prlimit", "--nofile=1024:1024"]);
    assert_eq!(
        nofile(&d.pid.to_string()),
        (1024, 1024),
        "the wrapper did not limit the daemon (pid {})",
        d.pid
    );
    assert_idle(&d, "before the flood");
    let addr = addr_of(&d);
    let fds_idle = fd_count(d.pid);

    // More half-sent heads than the daemon has descriptors, all held open by this process.
    let mut held: Vec<TcpStream> = Vec::with_capacity(STALLED + AT_SIGTERM);
    let mut max_fds = fds_idle;
    let opening = Instant::now();
    for i in 0..STALLED {
        held.push(stalled(addr));
        if i % 25 == 0 {
            max_fds = max_fds.max(fd_count(d.pid));
        }
    }
    let opened_in = opening.elapsed();
    max_fds = max_fds.max(fd_count(d.pid));

    // A fresh poll is served at once: at the cap, the daemon closes the connection idle the
    // longest. (Without the cap, the daemon ran out of descriptors and stopped accepting: the
    // connects above timed out, and a poll was never answered.)
    let asked = Instant::now();
    let answer = d.try_request("GET", "/api/v1.0/progress", None);
    let answered_in = asked.elapsed();
    let (status, _, text) =
        answer.unwrap_or_else(|e| panic!("after {answered_in:?}: {e}\n{}", d.log_text()));
    assert_eq!(status, 200, "{text}");
    let p = snap_of(&serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")));
    assert_eq!((p.code, p.stage.as_str()), (200, "idle"), "{p:?}");
    assert!(
        answered_in < Duration::from_secs(15),
        "GET /progress took {answered_in:?} behind {STALLED} stalled connections"
    );
    max_fds = max_fds.max(fd_count(d.pid));
    let hwm = status_kb(d.pid, "VmHWM");

    // SIGTERM while the daemon holds half-sent heads: they close at once, the daemon exits 0.
    // A fresh batch, so the daemon surely holds some (the header timer ends older ones).
    for _ in 0..AT_SIGTERM {
        held.push(stalled(addr));
    }
    let holding = wait_until(
        || {
            format!(
                "the daemon to accept {AT_SIGTERM} stalled connections; it holds {} sockets",
                sockets(d.pid)
            )
        },
        || Some(sockets(d.pid)).filter(|n| *n >= AT_SIGTERM),
    );
    max_fds = max_fds.max(fd_count(d.pid));
    assert!(d.exited().is_none(), "the daemon died: {}", d.log_text());
    let termed = Instant::now();
    let st = d.sigterm();
    let exited_in = termed.elapsed();
    let seen = format!(
        "{STALLED} stalled connections opened in {opened_in:?}; GET /progress answered in \
         {answered_in:?}; daemon fds {fds_idle} idle, at most {max_fds} under the flood; \
         VmHWM {} KiB; {holding} sockets at SIGTERM, exit {st} after {exited_in:?}",
        hwm >> 10
    );
    eprintln!("{seen}");
    assert_eq!(
        st.code(),
        Some(0),
        "SIGTERM with stalled connections open: {seen}\n{}",
        d.log_text()
    );
    assert!(exited_in < Duration::from_secs(10), "slow exit after SIGTERM: {seen}");
    assert!(hwm < 32 << 20, "peak RSS too high: {seen}");
    // The cap bounds descriptors, not only table entries: the daemon never nears its limit.
    assert!(
        max_fds <= API_CONNECTIONS_MAX + FDS_BESIDES_CONNECTIONS,
        "more than {API_CONNECTIONS_MAX} + {FDS_BESIDES_CONNECTIONS} descriptors open: {seen}"
    );
    drop(held);
}

// ---------------------------------------------------------------- 2. the header timer

#[test]
fn a_stalled_head_is_closed_after_the_header_timeout() {
    let rig = Rig::new();
    let d = rig.start();
    let addr = addr_of(&d);
    let since = Instant::now();
    let mut s = stalled(addr);
    let mut polls = 0;
    let mut got = Vec::new();
    let ended = read_until(
        &mut s,
        &mut got,
        since,
        HANG,
        "the daemon to close a half-sent head",
        |_| false,
        || {
            assert_idle(&d, "while a head stalls");
            polls += 1;
        },
    );
    let closed_in = since.elapsed();
    assert_eq!(ended, Ended::Closed);
    assert!(
        closed_in >= HEADER_TIMEOUT_FLOOR,
        "closed after {closed_in:?}: sooner than the header timeout"
    );
    assert!(
        closed_in < STALL_TIMEOUT,
        "closed after {closed_in:?}: not by the header timer (the sweeper would close it at 15 s)"
    );
    assert!(polls > 0, "/progress was never asked while the head stalled");
    assert_idle(&d, "after the stalled head was closed");
    eprintln!(
        "half-sent head closed after {closed_in:?} ({polls} /progress answers meanwhile; \
         bytes from the daemon: {got:?})"
    );
}

#[test]
fn an_idle_keepalive_connection_is_closed_after_the_header_timeout() {
    let rig = Rig::new();
    let d = rig.start();
    let mut s = connect(addr_of(&d));
    s.write_all(FULL_HEAD).unwrap();
    let mut got = Vec::new();
    let ended = read_until(
        &mut s,
        &mut got,
        Instant::now(),
        HANG,
        "the answer to GET /progress",
        |b| answer_in(b).is_some(),
        || {},
    );
    assert_eq!(
        ended,
        Ended::Complete,
        "the daemon closed before answering: {:?}",
        String::from_utf8_lossy(&got)
    );
    let since = Instant::now();
    let a = answer_in(&got).unwrap();
    assert!(a.status_line.starts_with("HTTP/1.1 200"), "{a:?}");
    assert!(
        !a.headers.get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")),
        "the daemon did not keep the connection alive: {a:?}"
    );
    let p = snap_of(&a.json());
    assert_eq!((p.code, p.stage.as_str()), (200, "idle"), "{p:?}");

    let mut after = Vec::new();
    let ended = read_until(
        &mut s,
        &mut after,
        since,
        HANG,
        "the daemon to close an idle keep-alive connection",
        |_| false,
        || {},
    );
    let closed_in = since.elapsed();
    assert_eq!(ended, Ended::Closed);
    assert!(
        closed_in >= HEADER_TIMEOUT_FLOOR,
        "closed {closed_in:?} after the answer: sooner than the header timeout"
    );
    assert!(
        closed_in < STALL_TIMEOUT,
        "closed {closed_in:?} after the answer: not by the header timer (the sweeper would at 15 s)"
    );
    assert_idle(&d, "after the idle connection was closed");
    eprintln!(
        "idle keep-alive connection closed {closed_in:?} after the answer \
         (bytes meanwhile: {after:?})"
    );
}

// ---------------------------------------------------------------- 3. the body timer

#[test]
fn a_trickled_body_is_refused_after_the_body_timeout_and_starts_nothing() {
    let rig = Rig::new();
    let d = rig.start();
    let since = Instant::now();
    let mut s = connect(addr_of(&d));
    s.write_all(
        b"POST /api/v1.0/download HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"version\"",
    )
    .unwrap();
    let mut polls = 0;
    let mut got = Vec::new();
    let ended = read_until(
        &mut s,
        &mut got,
        since,
        HANG,
        "the answer to a POST whose body stalls",
        |b| answer_in(b).is_some(),
        || {
            assert_idle(&d, "while a body stalls");
            polls += 1;
        },
    );
    let answered_in = since.elapsed();
    assert_eq!(
        ended,
        Ended::Complete,
        "the daemon closed without answering: {:?}",
        String::from_utf8_lossy(&got)
    );
    let a = answer_in(&got).unwrap();
    assert!(
        a.status_line.starts_with("HTTP/1.1 200"),
        "the contract always answers HTTP 200: {a:?}"
    );
    assert!(
        a.headers.get("content-type").is_some_and(|c| c.starts_with("application/json")),
        "{a:?}"
    );
    let v = a.json();
    assert_eq!(v["code"], 400, "{v}");
    let msg = v["msg"].as_str().unwrap_or_else(|| panic!("no msg: {v}"));
    assert!(msg.starts_with("VALIDATION_ERROR: request body not received within"), "{v}");
    assert!(
        answered_in >= BODY_TIMEOUT_FLOOR,
        "answered after {answered_in:?}: sooner than the body timeout"
    );
    assert!(polls > 0, "/progress was never asked while the body stalled");

    // Nothing started, nothing fetched.
    assert_idle(&d, "after the refused download");
    assert!(d.status()["in_flight"].is_null(), "{}", d.status());
    assert!(rig.server.hits().is_empty(), "the package server was asked: {:?}", rig.server.hits());
    eprintln!("trickled body refused after {answered_in:?}: {v}");
}

// ---------------------------------------------------------------- 4. a silent device-api

/// A device-api stand-in that accepts connections and never reads or answers; it holds them
/// until dropped (the end of the test).
struct BlackHole {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BlackHole {
    fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, sp) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let held: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());
            accept_loop(listener, &sp, |s| {
                n.fetch_add(1, Ordering::SeqCst);
                lock(&held).push(s);
            });
        });
        BlackHole { port, accepted, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}{REPORT_PATH}", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_report_receiver_that_never_answers_holds_up_neither_install_nor_progress() {
    let hole = BlackHole::start();
    let rig = Rig::new();
    let config = std::fs::read_to_string(&rig.env.config).unwrap();
    assert!(config.contains(&rig.receiver.url()), "the rig's config names no receiver:\n{config}");
    std::fs::write(&rig.env.config, config.replace(&rig.receiver.url(), &hole.url())).unwrap();
    rig.put(FACTORY);
    let modules = small_modules("2.0.0");
    let pkg = build_pkg(&rig.env, "2.0.0", &modules);
    rig.server.add(&pkg);
    let d = rig.start();

    let started_at = Instant::now();
    download(&rig, &d, &pkg);
    // The first report's POST now hangs on the silent device-api: it started after
    // `started_at`, and lasts the reporter's whole timeout (REPORT_TIMEOUT_MS, 5 s).
    let reached = wait_until(
        || "the daemon to connect to the silent device-api".into(),
        || Some(hole.accepted()).filter(|n| *n > 0),
    );
    install(&d, "2.0.0");
    let flow = started_at.elapsed();
    // So a flow shorter than that timeout ran its install while that POST hung, and waited
    // for no delivery (it takes well under a second; each report it waited for costs 5 s).
    assert!(
        flow < REPORT_TIMEOUT,
        "download + install took {flow:?} with a silent device-api: it waited for a report"
    );

    for m in &modules {
        assert_eq!(
            rig.env.read(m.rel).as_deref(),
            Some(&m.content[..]),
            "{} after the install",
            m.rel
        );
    }
    assert_eq!(current_version(&d.status()).as_deref(), Some("2.0.0"));
    assert_eq!(d.progress(), snap("success", 100, DONE));
    assert!(
        rig.receiver.attempts().is_empty(),
        "the reports went to the answering receiver: {:?}",
        rig.receiver.attempts()
    );
    eprintln!(
        "download + install with a silent device-api: {flow:?}; \
         {reached} report connections held unanswered"
    );
}
