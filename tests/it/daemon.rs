//! The daemon (SPEC §5): `tope-updater serve` as a real process, driven over real HTTP the
//! way device-api and the GUI drive it, against two small HTTP/1.1 servers in the test, both
//! on std `TcpListener`s:
//!
//! - a **package server** (`PkgServer`) that serves packages built in the test, honours
//!   `Range: bytes=N-`, and can be told to hold the body at a byte offset (`gate`: a kill or a
//!   SIGTERM then lands mid-download, deterministically), to trickle it, to drop the
//!   connection once mid-body, to answer 503, or to answer 200 to a Range request; it logs
//!   every request line with its Range header and the status it answered;
//! - a **report receiver** (`Receiver`) that answers as device-api's callback contract says
//!   (`contracts/device-api-callbacks.yaml`), records every body in arrival order, can answer
//!   `code 500` (not acknowledged), and can be taken down and brought back on the same port.
//!
//! Every daemon is a `Daemon` guard: `SIGKILLed` and reaped when dropped, also when an
//! assertion fails (then its log is printed). Nothing is asserted by sleeping: every wait
//! polls with a generous deadline (`PATIENCE`), and mid-download events are pinned by the
//! package server's gate rather than by timing. The crash tests and the tests that watch the
//! install progress need `--features failpoints` (crash points, and `sleep` actions that hold
//! the install in a phase long enough to be seen).
//!
//! Run with `cargo test --features failpoints --test it daemon`.

use crate::support::*;
use md5::{Digest, Md5};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long to wait for something that should happen promptly (generous: a loaded 2-core
/// machine). Only a bound against hanging forever, never a measurement.
pub(crate) const PATIENCE: Duration = Duration::from_secs(120);
pub(crate) const POLL: Duration = Duration::from_millis(20);
pub(crate) const REPORT_PATH: &str = "/api/v1.0/ota/report";
pub(crate) const READY: &str = "Package verified successfully, ready for installation";
pub(crate) const DONE: &str = "Update completed successfully";
/// Environment variables that would route the daemon's HTTP through a proxy.
pub(crate) const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn wait_until<T>(what: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() <= deadline, "gave up after {PATIENCE:?} waiting for {}", what());
        std::thread::sleep(POLL);
    }
}

pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim().to_string()
}

// ---------------------------------------------------------------- minimal HTTP/1.1

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request head: the request line, the headers (names lowercased), and the bytes read
/// past the head.
pub(crate) struct Head {
    pub(crate) line: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) rest: Vec<u8>,
}

pub(crate) fn read_head(s: &mut TcpStream) -> Option<Head> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = text.split("\r\n");
            let line = lines.next()?.to_string();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            return Some(Head { line, headers, rest: buf[end + 4..].to_vec() });
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// A chunked body, once all of it (up to the empty line after the last chunk) is in `data`.
pub(crate) fn decode_chunked(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let eol = find(&data[pos..], b"\r\n")? + pos;
        let size = usize::from_str_radix(
            std::str::from_utf8(&data[pos..eol]).ok()?.split(';').next()?.trim(),
            16,
        )
        .ok()?;
        if size == 0 {
            find(&data[eol..], b"\r\n\r\n")?;
            return Some(out);
        }
        pos = eol + 2;
        if data.len() < pos + size + 2 {
            return None;
        }
        out.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}

pub(crate) fn read_body(s: &mut TcpStream, head: &Head) -> Option<Vec<u8>> {
    let mut data = head.rest.clone();
    let mut tmp = [0u8; 4096];
    if let Some(len) = head.headers.get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while data.len() < len {
            let n = s.read(&mut tmp).ok()?;
            if n == 0 {
                return None;
            }
            data.extend_from_slice(&tmp[..n]);
        }
        data.truncate(len);
        return Some(data);
    }
    if head.headers.get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            if let Some(body) = decode_chunked(&data) {
                return Some(body);
            }
            let n = s.read(&mut tmp).ok()?;
            if n == 0 {
                return None;
            }
            data.extend_from_slice(&tmp[..n]);
        }
    }
    Some(Vec::new())
}

/// Accepts on a non-blocking listener until `stop`, handing each connection to `handle`.
pub(crate) fn accept_loop(
    listener: TcpListener,
    stop: &AtomicBool,
    mut handle: impl FnMut(TcpStream),
) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                handle(s);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

// ---------------------------------------------------------------- the package server

/// How the package server answers; change it at any time with `PkgServer::set`.
#[derive(Debug, Clone)]
pub(crate) struct Serve {
    /// Bytes per write.
    pub(crate) chunk: usize,
    /// Pause after each write.
    pub(crate) delay: Duration,
    /// No body byte at or past this offset is sent until the gate moves or is cleared.
    pub(crate) gate: Option<u64>,
    /// Answer 503 to this many requests.
    pub(crate) fail_next: u32,
    /// Answer 200 with the whole body to a Range request.
    pub(crate) ignore_range: bool,
    /// Once: close the connection when the body reaches this offset.
    pub(crate) drop_at: Option<u64>,
}

impl Default for Serve {
    fn default() -> Self {
        Serve {
            chunk: 64 * 1024,
            delay: Duration::ZERO,
            gate: None,
            fail_next: 0,
            ignore_range: false,
            drop_at: None,
        }
    }
}

/// One request the package server answered.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) line: String,
    pub(crate) range: Option<String>,
    pub(crate) status: u16,
}

impl Hit {
    /// N of a `Range: bytes=N-` header.
    pub(crate) fn range_start(&self) -> Option<u64> {
        self.range.as_deref()?.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
    }
}

#[derive(Default)]
pub(crate) struct PkgState {
    pub(crate) files: BTreeMap<String, Arc<Vec<u8>>>,
    pub(crate) serve: Serve,
    pub(crate) hits: Vec<Hit>,
}

pub(crate) struct PkgServer {
    pub(crate) port: u16,
    pub(crate) state: Arc<Mutex<PkgState>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) accept: Option<JoinHandle<()>>,
}

impl PkgServer {
    pub(crate) fn start() -> PkgServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(PkgState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            let stop = sp.clone();
            accept_loop(listener, &sp, move |s| {
                let (st, stop) = (st.clone(), stop.clone());
                // One thread per connection: a held (gated) body must not block the next request.
                std::thread::spawn(move || serve_package(s, &st, &stop));
            });
        });
        PkgServer { port, state, stop, accept: Some(accept) }
    }

    pub(crate) fn add(&self, pkg: &Pkg) {
        lock(&self.state).files.insert(pkg.name.clone(), Arc::new(pkg.bytes.clone()));
    }

    pub(crate) fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/ota/{name}", self.port)
    }

    pub(crate) fn set(&self, f: impl FnOnce(&mut Serve)) {
        f(&mut lock(&self.state).serve);
    }

    pub(crate) fn hits(&self) -> Vec<Hit> {
        lock(&self.state).hits.clone()
    }
}

impl Drop for PkgServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn serve_package(mut s: TcpStream, state: &Mutex<PkgState>, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = s.set_nodelay(true);
    let Some(head) = read_head(&mut s) else { return };
    let mut words = head.line.split(' ');
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let range = head.headers.get("range").cloned();
    let (status, file, start) = {
        let mut g = lock(state);
        let file = path.strip_prefix("/ota/").and_then(|n| g.files.get(n)).cloned();
        let requested = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes=")?.split('-').next()?.parse::<u64>().ok());
        let (status, start) = match (&file, requested) {
            _ if g.serve.fail_next > 0 => {
                g.serve.fail_next -= 1;
                (503, 0)
            }
            (None, _) => (404, 0),
            (Some(f), Some(n)) if !g.serve.ignore_range => {
                if n >= f.len() as u64 {
                    (416, 0)
                } else {
                    (206, n)
                }
            }
            (Some(_), _) => (200, 0),
        };
        g.hits.push(Hit { line: head.line.clone(), range: range.clone(), status });
        (status, file, start)
    };
    let len = file.as_ref().map_or(0, |f| f.len() as u64);
    let headers = match status {
        503 => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string(),
        404 => {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
        }
        416 => {
            format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        }
        206 => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Type: application/zip\r\n\
             Content-Range: bytes {start}-{}/{len}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            len - 1,
            len - start
        ),
        _ => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nAccept-Ranges: bytes\r\n\
             Content-Length: {len}\r\nConnection: close\r\n\r\n"
        ),
    };
    if s.write_all(headers.as_bytes()).is_err() || method == "HEAD" {
        return;
    }
    let Some(body) = file.filter(|_| matches!(status, 200 | 206)) else { return };
    let mut pos = start;
    while pos < len {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let serve = lock(state).serve.clone();
        if serve.gate.is_some_and(|g| pos >= g) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if serve.drop_at.is_some_and(|d| pos >= d) {
            lock(state).serve.drop_at = None;
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        let mut end = (pos + serve.chunk.max(1) as u64).min(len);
        if let Some(g) = serve.gate {
            end = end.min(g);
        }
        if let Some(d) = serve.drop_at {
            end = end.min(d);
        }
        if s.write_all(&body[pos as usize..end as usize]).is_err() {
            return;
        }
        pos = end;
        if !serve.delay.is_zero() {
            std::thread::sleep(serve.delay);
        }
    }
}

// ---------------------------------------------------------------- the report receiver

/// One POST the receiver read completely.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub(crate) line: String,
    pub(crate) content_type: String,
    pub(crate) body: Value,
    pub(crate) acked: bool,
}

#[derive(Default)]
pub(crate) struct RecvState {
    pub(crate) attempts: Vec<Attempt>,
    /// Answer `code 500` (not an acknowledgement) to this many POSTs.
    pub(crate) nack_next: u32,
}

/// device-api's `POST /ota/report`, as the callback contract describes it.
pub(crate) struct Receiver {
    pub(crate) port: u16,
    pub(crate) state: Arc<Mutex<RecvState>>,
    pub(crate) running: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
}

impl Receiver {
    pub(crate) fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let r = Receiver {
            port: listener.local_addr().unwrap().port(),
            state: Arc::default(),
            running: Mutex::new(None),
        };
        r.run(listener);
        r
    }

    pub(crate) fn run(&self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (self.state.clone(), stop.clone());
        // Sequential: one report at a time, in arrival order.
        let t = std::thread::spawn(move || accept_loop(listener, &sp, |s| receive_report(s, &st)));
        *lock(&self.running) = Some((stop, t));
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}{REPORT_PATH}", self.port)
    }

    /// Closes the port: connections are refused until `up`.
    pub(crate) fn down(&self) {
        if let Some((stop, t)) = lock(&self.running).take() {
            stop.store(true, Ordering::SeqCst);
            let _ = t.join();
        }
    }

    /// Listens again on the same port.
    pub(crate) fn up(&self) {
        let listener = wait_until(
            || format!("port {} to be free again", self.port),
            || TcpListener::bind(("127.0.0.1", self.port)).ok(),
        );
        self.run(listener);
    }

    pub(crate) fn nack_next(&self, n: u32) {
        lock(&self.state).nack_next = n;
    }

    /// Every complete POST, acknowledged or not, in arrival order.
    pub(crate) fn attempts(&self) -> Vec<Attempt> {
        lock(&self.state).attempts.clone()
    }

    /// The acknowledged bodies, in arrival order.
    pub(crate) fn reports(&self) -> Vec<Value> {
        self.attempts().into_iter().filter(|a| a.acked).map(|a| a.body).collect()
    }

    /// Waits until the acknowledged reports satisfy `done`; returns them.
    pub(crate) fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        wait_until(
            || format!("device-api to receive {what}; it has: {:#?}", self.reports()),
            || {
                let r = self.reports();
                done(&r).then_some(r)
            },
        )
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

pub(crate) fn receive_report(mut s: TcpStream, state: &Mutex<RecvState>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(head) = read_head(&mut s) else { return };
    let Some(raw) = read_body(&mut s, &head) else { return };
    let body = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()));
    let acked = {
        let mut g = lock(state);
        let acked = g.nack_next == 0;
        g.nack_next = g.nack_next.saturating_sub(1);
        let content_type = head.headers.get("content-type").cloned().unwrap_or_default();
        g.attempts.push(Attempt { line: head.line.clone(), content_type, body, acked });
        acked
    };
    let answer = if acked {
        json!({"code": 200, "msg": "success", "data": {"status": "received"}})
    } else {
        json!({"code": 500, "msg": "INTERNAL_ERROR: Failed to persist OTA status to database"})
    }
    .to_string();
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = s.flush();
}

// ---------------------------------------------------------------- packages

/// One single-file module: `rel` is its destination under the allowed root.
pub(crate) struct Module {
    pub(crate) name: &'static str,
    pub(crate) rel: &'static str,
    pub(crate) content: Vec<u8>,
}

pub(crate) struct Pkg {
    pub(crate) version: String,
    pub(crate) name: String,
    pub(crate) bytes: Vec<u8>,
    pub(crate) md5: String,
}

pub(crate) fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A package for `env` (destinations under its root), stored uncompressed so that large
/// incompressible test files cost no deflate time.
pub(crate) fn build_pkg(env: &Env, version: &str, modules: &[Module]) -> Pkg {
    build_pkg_with(env, version, modules, |_| {})
}

/// `build_pkg` with the manifest changed by `tweak` first.
pub(crate) fn build_pkg_with(
    env: &Env,
    version: &str,
    modules: &[Module],
    tweak: impl FnOnce(&mut Value),
) -> Pkg {
    let srcs: Vec<String> = modules.iter().map(|m| format!("files/{}", m.rel)).collect();
    let dsts: Vec<String> = modules.iter().map(|m| env.dst(m.rel)).collect();
    let triples: Vec<(&str, &str, &str)> = modules
        .iter()
        .zip(&srcs)
        .zip(&dsts)
        .map(|((m, s), d)| (m.name, s.as_str(), d.as_str()))
        .collect();
    let mut man: Value = serde_json::from_str(&manifest(version, &triples)).unwrap();
    tweak(&mut man);
    let man = man.to_string();
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .unix_permissions(0o644);
        z.start_file("manifest.json", opts).unwrap();
        z.write_all(man.as_bytes()).unwrap();
        for (m, src) in modules.iter().zip(&srcs) {
            z.start_file(src.as_str(), opts).unwrap();
            z.write_all(&m.content).unwrap();
        }
        z.finish().unwrap();
    }
    let bytes = buf.into_inner();
    Pkg {
        version: version.into(),
        name: format!("tope-update-{version}.zip"),
        md5: md5_hex(&bytes),
        bytes,
    }
}

/// The tree a fresh device holding `factory` must end with after `packages` are installed in
/// order, from the package rules alone and never from the engine's own output: each module's
/// file holds its content with its entry's mode (0644 in `build_pkg`'s packages), every
/// directory on the way exists with mode 0755 (made so by `Env::put`, and by the engine for a
/// directory a package creates), and a factory file no module names is kept as it was.
pub(crate) fn reference_tree(
    factory: &[(&str, &[u8])],
    packages: &[(&str, &[Module])],
) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    let mut put = |rel: &str, content: &[u8]| {
        let mut dir = String::new();
        for part in rel.split('/').collect::<Vec<_>>().split_last().expect("a path").1 {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(part);
            t.insert(dir.clone(), "dir 755".to_string());
        }
        t.insert(rel.to_string(), format!("file 644 {}", blake3::hash(content).to_hex()));
    };
    for (rel, content) in factory {
        put(rel, content);
    }
    for (_, modules) in packages {
        for m in *modules {
            put(m.rel, &m.content);
        }
    }
    t
}

// ---------------------------------------------------------------- the device under test

pub(crate) struct Setup {
    pub(crate) allow_http: bool,
    pub(crate) retries: u32,
    pub(crate) result_hold_s: u64,
    pub(crate) trust_window_h: u64,
    /// More `[api]` keys (`allowed_uids = [...]`, ...).
    pub(crate) api_extra: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            allow_http: true,
            retries: 3,
            result_hold_s: 600,
            trust_window_h: 24,
            api_extra: String::new(),
        }
    }
}

/// A device (temp root + state dir + config), its package server and its device-api.
pub(crate) struct Rig {
    pub(crate) env: Env,
    pub(crate) server: PkgServer,
    pub(crate) receiver: Receiver,
}

impl Rig {
    pub(crate) fn new() -> Rig {
        Rig::with(Setup::default())
    }

    pub(crate) fn with(s: Setup) -> Rig {
        let receiver = Receiver::start();
        let server = PkgServer::start();
        let env = Env::with_config(&format!(
            "[api]\nlisten = \"127.0.0.1:0\"\nresult_hold_s = {}\n{}\n\
             [reporter]\nurl = {:?}\n\
             [download]\nallow_http = {}\nretries = {}\ntrust_window_h = {}\n",
            s.result_hold_s,
            s.api_extra,
            receiver.url(),
            s.allow_http,
            s.retries,
            s.trust_window_h
        ));
        Rig { env, server, receiver }
    }

    pub(crate) fn put(&self, files: &[(&str, &[u8])]) {
        for (rel, content) in files {
            self.env.put(rel, content, 0o644);
        }
    }

    pub(crate) fn start(&self) -> Daemon {
        Daemon::start(&self.env, None)
    }

    pub(crate) fn start_with(&self, failpoints: Option<&str>) -> Daemon {
        Daemon::start(&self.env, failpoints)
    }

    /// The `POST /download` body for `pkg` on this rig's server.
    pub(crate) fn request(&self, pkg: &Pkg) -> String {
        json!({
            "version": pkg.version,
            "package_url": self.server.url(&pkg.name),
            "package_name": pkg.name,
            "package_size": pkg.bytes.len(),
            "package_md5": pkg.md5,
        })
        .to_string()
    }

    /// Where the daemon keeps a downloaded package.
    pub(crate) fn downloaded(&self, pkg: &Pkg) -> PathBuf {
        self.env.state.join("downloads").join(&pkg.name)
    }

    /// Makes the daemon push one more report (a download the server answers 404, which
    /// fails at once) and waits until device-api has it: then every report pushed before it
    /// has been delivered too (delivery is in order). Returns the reports received.
    pub(crate) fn marker(&self, d: &Daemon) -> Vec<Value> {
        let is_marker = |r: &Value| {
            r["stage"] == "failed"
                && r["error"].as_str().is_some_and(|e| e.contains("marker-missing"))
        };
        let before = self.receiver.reports().iter().filter(|r| is_marker(r)).count();
        let body = json!({
            "version": "9.9.9",
            "package_url": self.server.url("marker-missing.zip"),
            "package_name": "marker-missing.zip",
            "package_size": 10,
            "package_md5": "0123456789abcdef0123456789abcdef",
        });
        // A job may still run (e.g. one the start-up resumed): the marker waits its turn.
        let v = wait_until(
            || "POST /download of the marker to be accepted".into(),
            || Some(d.post("/api/v1.0/download", &body.to_string())).filter(|v| v["code"] != 409),
        );
        assert_eq!(v, started("downloading"));
        self.receiver.wait_for("the marker report (a failed download)", |r| {
            r.iter().filter(|r| is_marker(r)).count() > before
        })
    }
}

pub(crate) static DAEMONS: AtomicU32 = AtomicU32::new(0);

/// `GET /progress`, normalised: the contract's `failed` shape keeps the error in `msg` and
/// the stage and progress at the root.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snap {
    pub(crate) code: i64,
    pub(crate) stage: String,
    pub(crate) progress: u64,
    pub(crate) message: String,
    pub(crate) error: Option<String>,
}

pub(crate) fn bad<T>(v: &Value) -> T {
    panic!("GET /progress: unexpected shape: {v}")
}

pub(crate) fn sorted_keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> =
        v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    keys.sort_unstable();
    keys
}

pub(crate) fn snap_of(v: &Value) -> Snap {
    match v["code"].as_i64() {
        Some(200) => {
            let d = &v["data"];
            assert_eq!(
                sorted_keys(d),
                ["error", "message", "progress", "stage"],
                "GET /progress data fields: {v}"
            );
            assert!(d["error"].is_null() || d["error"].is_string(), "{v}");
            Snap {
                code: 200,
                stage: d["stage"].as_str().unwrap_or_else(|| bad(v)).into(),
                progress: d["progress"].as_u64().unwrap_or_else(|| bad(v)),
                message: d["message"].as_str().unwrap_or_else(|| bad(v)).into(),
                error: d["error"].as_str().map(str::to_string),
            }
        }
        Some(code) => {
            // The contract's failed shape, plus `data` as the legacy GUI reads it.
            assert_eq!(
                sorted_keys(v),
                ["code", "data", "msg", "progress", "stage"],
                "GET /progress failed shape: {v}"
            );
            assert_eq!(v["stage"], "failed", "{v}");
            let msg = v["msg"].as_str().unwrap_or_else(|| bad(v)).to_string();
            let d = &v["data"];
            // No `error` in it: the answer must match one branch of the contract's oneOf only.
            assert_eq!(
                sorted_keys(d),
                ["message", "progress", "stage"],
                "GET /progress failed data: {v}"
            );
            assert_eq!(
                (&d["stage"], &d["progress"], &d["message"]),
                (&v["stage"], &v["progress"], &v["msg"]),
                "failed data: {v}"
            );
            Snap {
                code,
                stage: "failed".into(),
                progress: v["progress"].as_u64().unwrap_or_else(|| bad(v)),
                message: msg.clone(),
                error: Some(msg),
            }
        }
        None => bad(v),
    }
}

pub(crate) fn snap(stage: &str, progress: u64, message: &str) -> Snap {
    Snap { code: 200, stage: stage.into(), progress, message: message.into(), error: None }
}

/// `{code: 200, msg: "success", data: {status}}`: the answer to a command that started.
pub(crate) fn started(status: &str) -> Value {
    json!({"code": 200, "msg": "success", "data": {"status": status}})
}

/// A running `tope-updater serve`. Dropping it SIGKILLs and reaps the process.
pub(crate) struct Daemon {
    pub(crate) child: Mutex<Child>,
    pub(crate) pid: i32,
    pub(crate) base: String,
    pub(crate) log: PathBuf,
    pub(crate) agent: ureq::Agent,
}

impl Daemon {
    /// Starts the daemon and waits for its `listening on ADDR` line.
    pub(crate) fn start(env: &Env, failpoints: Option<&str>) -> Daemon {
        Daemon::start_wrapped(env, failpoints, &[])
    }

    /// `start` with the daemon run under `wrapper` (e.g. `["prlimit", "--nofile=1024"]`), which
    /// must exec it (the pid is then the daemon's).
    pub(crate) fn start_wrapped(env: &Env, failpoints: Option<&str>, wrapper: &[&str]) -> Daemon {
        let n = DAEMONS.fetch_add(1, Ordering::Relaxed);
        let log = env.tmp.path().join(format!("daemon-{n}.log"));
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg("--").arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("--config").arg(&env.config).arg("serve");
        cmd.env("NO_COLOR", "1")
            .env_remove("FAILPOINTS")
            .env_remove("TOPE_BOOT_ID_FILE")
            .env_remove("TOPE_UPDATER_CONFIG");
        for v in PROXY_VARS {
            cmd.env_remove(v);
        }
        if let Some(fp) = failpoints {
            cmd.env("FAILPOINTS", fp);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Keeps draining stdout after the line, so the pipe never fills.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.trim().strip_prefix("listening on ")
                    && let Some(t) = tx.take()
                {
                    let _ = t.send(addr.to_string());
                }
            }
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut d = Daemon {
            pid: child.id() as i32,
            child: Mutex::new(child),
            base: String::new(),
            log,
            agent,
        };
        match rx.recv_timeout(PATIENCE) {
            Ok(addr) => d.base = format!("http://{addr}"),
            Err(e) => panic!(
                "the daemon never printed `listening on ADDR` ({e}); exit {:?}\n{}",
                d.exited(),
                d.log_text()
            ),
        }
        d
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request; `Err` when the daemon could not be reached or did not answer.
    pub(crate) fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String, String), String> {
        let url = format!("{}{path}", self.base);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            (_, Some(b)) => {
                self.agent.post(&url).header("Content-Type", "application/json").send(b)
            }
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let mut resp = resp.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text =
            resp.body_mut().read_to_string().map_err(|e| format!("{method} {path}: body: {e}"))?;
        Ok((status, ct, text))
    }

    /// A request that must be answered with HTTP 200 and JSON (the contract: always 200).
    pub(crate) fn json(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let (status, ct, text) = self
            .try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()));
        assert_eq!(
            status, 200,
            "{method} {path}: HTTP {status} (the contract always answers 200): {text}"
        );
        assert!(ct.starts_with("application/json"), "{method} {path}: content-type {ct:?}");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"))
    }

    pub(crate) fn get(&self, path: &str) -> Value {
        self.json("GET", path, None)
    }

    pub(crate) fn post(&self, path: &str, body: &str) -> Value {
        self.json("POST", path, Some(body))
    }

    pub(crate) fn progress(&self) -> Snap {
        snap_of(&self.get("/api/v1.0/progress"))
    }

    /// `data` of `GET /status`.
    pub(crate) fn status(&self) -> Value {
        let v = self.get("/api/v1.0/status");
        assert_eq!((&v["code"], &v["msg"]), (&json!(200), &json!("success")), "GET /status: {v}");
        v["data"].clone()
    }

    pub(crate) fn exited(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// Waits for the process to end by itself.
    pub(crate) fn wait_exit(&self) -> ExitStatus {
        wait_until(
            || format!("the daemon (pid {}) to exit; log:\n{}", self.pid, self.log_text()),
            || self.exited(),
        )
    }

    pub(crate) fn sigterm(&self) -> ExitStatus {
        kill(Pid::from_raw(self.pid), Signal::SIGTERM).unwrap();
        self.wait_exit()
    }

    pub(crate) fn sigkill(&self) {
        let mut c = lock(&self.child);
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Polls `/progress` until `done`; returns every distinct snapshot seen, the last one
    /// satisfying `done`. Fails fast if the daemon dies, or shows `failed` unless `done`
    /// accepts it.
    pub(crate) fn watch(&self, what: &str, done: impl Fn(&Snap) -> bool) -> Vec<Snap> {
        self.watch_after(None, what, done)
    }

    /// `watch` right after a command: until its job publishes, /progress may still show
    /// `stale`, the snapshot from before the command (a stale `failed` is no failure).
    pub(crate) fn watch_after(
        &self,
        stale: Option<&Snap>,
        what: &str,
        done: impl Fn(&Snap) -> bool,
    ) -> Vec<Snap> {
        let mut seen: Vec<Snap> = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.exited() {
                panic!(
                    "the daemon exited ({st}) while waiting for {what}; seen {seen:#?}\nlog:\n{}",
                    self.log_text()
                );
            }
            let s = self.progress();
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            if done(&s) {
                return seen;
            }
            assert!(
                !(s.stage == "failed" && Some(&s) != stale),
                "waiting for {what}, the daemon failed: {s:?}\nlog:\n{}",
                self.log_text()
            );
            assert!(
                Instant::now() <= deadline,
                "gave up after {PATIENCE:?} waiting for /progress to show {what}; \
                 seen: {seen:#?}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    pub(crate) fn wait_stage(&self, stage: &str) -> Vec<Snap> {
        self.watch(&format!("stage {stage}"), |s| s.stage == stage)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- daemon pid {} log {} (last 80 lines):\n{}",
                self.pid,
                self.log.display(),
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------- checks

/// The stages of `snaps` in order, consecutive repeats removed.
pub(crate) fn stages<'a>(stages: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in stages {
        if out.last().map(String::as_str) != Some(s) {
            out.push(s.to_string());
        }
    }
    out
}

/// The stages seen by polling appear in the order of `order` (polling may miss any of them).
pub(crate) fn assert_stage_order(snaps: &[Snap], order: &[&str]) {
    let mut at = 0;
    for s in snaps {
        let i = order
            .iter()
            .position(|o| *o == s.stage)
            .unwrap_or_else(|| panic!("unexpected stage {s:?}; seen {snaps:#?}"));
        assert!(i >= at, "stage {} after {}: {snaps:#?}", s.stage, order[at]);
        at = i;
    }
}

/// The reports in the order device-api first received them. The first receptions carry
/// `seq` 1, 2, 3, ... exactly (nothing lost, nothing reordered); a report received again
/// (only where `redeliveries` is allowed: a crash can lose an acknowledgement) repeats the
/// body of an earlier one with the same `seq`.
pub(crate) fn first_deliveries(got: &[Value], redeliveries: bool) -> Vec<Value> {
    let mut firsts: Vec<Value> = Vec::new();
    for r in got {
        let seq = r["seq"].as_u64().unwrap_or_else(|| panic!("report without a numeric seq: {r}"));
        if seq as usize == firsts.len() + 1 {
            firsts.push(r.clone());
            continue;
        }
        let earlier = firsts.get((seq as usize).wrapping_sub(1));
        assert!(
            redeliveries && earlier.is_some(),
            "report seq {seq} out of order or repeated after {} first deliveries: {got:#?}",
            firsts.len()
        );
        assert_eq!(Some(r), earlier, "seq {seq} delivered again with another body");
    }
    firsts
}

/// The callback contract's body plus the extras (transaction id, boot id, seq, final).
pub(crate) fn check_report(r: &Value, boot: &str) {
    const STAGES: &[&str] = &[
        "idle",
        "downloading",
        "verifying",
        "toInstall",
        "installing",
        "rebooting",
        "success",
        "failed",
    ];
    assert!(r["stage"].as_str().is_some_and(|s| STAGES.contains(&s)), "report stage: {r}");
    assert!(r["progress"].as_u64().is_some_and(|p| p <= 100), "report progress: {r}");
    assert!(r["message"].is_string(), "report message: {r}");
    let failed = r["stage"] == "failed";
    assert!(
        if failed { r["error"].is_string() } else { r["error"].is_null() },
        "report error (a string exactly when failed): {r}"
    );
    assert!(r.get("tx_id").is_some_and(|t| t.is_null() || t.is_u64()), "report tx_id: {r}");
    assert_eq!(r["boot_id"], boot, "report boot_id: {r}");
    assert!(r["final"].is_boolean(), "report final: {r}");
}

/// Every POST went to the contract's path as JSON.
pub(crate) fn check_attempts(receiver: &Receiver) {
    for a in receiver.attempts() {
        assert!(
            a.line.starts_with(&format!("POST {REPORT_PATH} HTTP/1.1")),
            "report request line {:?}",
            a.line
        );
        assert!(
            a.content_type.starts_with("application/json"),
            "report content-type {:?}",
            a.content_type
        );
    }
}

pub(crate) fn finals_for(reports: &[Value], tx: u64) -> Vec<Value> {
    reports.iter().filter(|r| r["final"] == true && r["tx_id"] == tx).cloned().collect()
}

/// POST /download of `pkg`, then waits for `toInstall`.
pub(crate) fn download(rig: &Rig, d: &Daemon, pkg: &Pkg) -> Vec<Snap> {
    let before = d.progress();
    assert_eq!(d.post("/api/v1.0/download", &rig.request(pkg)), started("downloading"));
    let seen = d.watch_after(Some(&before), "stage toInstall", |s| s.stage == "toInstall");
    assert_eq!(seen.last(), Some(&snap("toInstall", 100, READY)));
    seen
}

pub(crate) fn update_body(version: &str) -> String {
    json!({ "version": version }).to_string()
}

/// POST /update, then waits for `success`.
pub(crate) fn install(d: &Daemon, version: &str) -> Vec<Snap> {
    let before = d.progress();
    assert_eq!(d.post("/api/v1.0/update", &update_body(version)), started("installing"));
    let seen = d.watch_after(Some(&before), "stage success", |s| s.stage == "success");
    assert_eq!(seen.last(), Some(&snap("success", 100, DONE)));
    seen
}

pub(crate) fn current_version(status: &Value) -> Option<String> {
    status["current"]["version"].as_str().map(str::to_string)
}

pub(crate) fn assert_code(v: &Value, code: i64, prefix: &str, ctx: &str) {
    assert_eq!(v["code"], code, "{ctx}: {v}");
    assert!(
        v["msg"].as_str().is_some_and(|m| m.starts_with(prefix) && m.len() > prefix.len()),
        "{ctx}: msg should start with {prefix:?}: {v}"
    );
}

pub(crate) fn small_modules(version: &str) -> Vec<Module> {
    let tag = |what: &str| format!("{what} {version}\n").into_bytes();
    vec![
        Module { name: "device-api", rel: "device-api/device-api", content: tag("device-api") },
        Module { name: "voice-app", rel: "voice-app/voice-app", content: tag("voice-app") },
        Module { name: "klippy", rel: "klippy/lib/klippy.py", content: tag("klippy") },
    ]
}

pub(crate) const FACTORY: &[(&str, &[u8])] = &[
    ("device-api/device-api", b"device-api factory\n"),
    ("voice-app/voice-app", b"voice-app factory\n"),
];

// ---------------------------------------------------------------- 1. idle

#[test]
fn progress_when_idle_is_the_legacy_idle_envelope() {
    let rig = Rig::new();
    let d = rig.start();
    let (status, ct, text) = d.try_request("GET", "/api/v1.0/progress", None).unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((&v["code"], &v["msg"]), (&json!(200), &json!("success")), "{v}");
    let s = snap_of(&v);
    assert_eq!((s.stage.as_str(), s.progress, s.error.as_ref()), ("idle", 0, None), "{v}");
    assert!(!s.message.is_empty(), "{v}");
    let st = d.status();
    assert!(
        st["current"].is_null() && st["in_flight"].is_null(),
        "GET /status on a fresh device: {st}"
    );
}

// ---------------------------------------------------------------- 2. validation

#[test]
fn download_validation_errors_are_code_400_in_an_http_200() {
    let rig = Rig::new();
    let d = rig.start();
    let base = json!({
        "version": "1.2.3",
        "package_url": rig.server.url("p.zip"),
        "package_name": "p.zip",
        "package_size": 1000,
        "package_md5": "0123456789abcdef0123456789abcdef",
    });
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b.to_string()
    };
    let without = |k: &str| {
        let mut b = base.clone();
        b.as_object_mut().unwrap().remove(k);
        b.to_string()
    };
    let md5_msg = "VALIDATION_ERROR: package_md5 must be 32-character hexadecimal string";
    let version_msg = "VALIDATION_ERROR: version must match semantic versioning pattern";
    // (case, body, exact message or a prefix the message must extend)
    let cases: Vec<(&str, String, &str, bool)> = vec![
        (
            "md5 not hex",
            with("package_md5", json!("a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6")),
            md5_msg,
            true,
        ),
        ("md5 too short", with("package_md5", json!("0123456789abcdef")), md5_msg, true),
        (
            "md5 upper case",
            with("package_md5", json!("0123456789ABCDEF0123456789ABCDEF")),
            md5_msg,
            true,
        ),
        ("missing package_md5", without("package_md5"), "VALIDATION_ERROR: ", false),
        ("missing version", without("version"), "VALIDATION_ERROR: ", false),
        ("not JSON", "this is not json".to_string(), "VALIDATION_ERROR: ", false),
        ("empty body", String::new(), "VALIDATION_ERROR: ", false),
        ("JSON array", "[1,2]".to_string(), "VALIDATION_ERROR: ", false),
        ("size 0", with("package_size", json!(0)), "VALIDATION_ERROR: ", false),
        ("size negative", with("package_size", json!(-5)), "VALIDATION_ERROR: ", false),
        ("size a string", with("package_size", json!("1000")), "VALIDATION_ERROR: ", false),
        ("version 1.2", with("version", json!("1.2")), version_msg, true),
        ("version v1.2.3", with("version", json!("v1.2.3")), version_msg, true),
        (
            "ftp url",
            with("package_url", json!("ftp://127.0.0.1/p.zip")),
            "VALIDATION_ERROR: ",
            false,
        ),
        ("name with a slash", with("package_name", json!("../p.zip")), "VALIDATION_ERROR: ", false),
        ("name ..", with("package_name", json!("..")), "VALIDATION_ERROR: ", false),
    ];
    for (case, body, msg, exact) in &cases {
        let v = d.post("/api/v1.0/download", body);
        if *exact {
            assert_eq!(v, json!({"code": 400, "msg": msg}), "{case}");
        } else {
            assert_code(&v, 400, msg, case);
            assert!(v.get("data").is_none_or(Value::is_null), "{case}: {v}");
        }
    }
    let v = d.post("/api/v1.0/update", &update_body("1.2"));
    assert_eq!(v, json!({"code": 400, "msg": version_msg}), "POST /update with a bad version");
    assert_code(
        &d.post("/api/v1.0/update", "{}"),
        400,
        "VALIDATION_ERROR: ",
        "POST /update without a version",
    );
    // Nothing was started, fetched or written.
    assert_eq!(d.progress().stage, "idle");
    assert!(rig.server.hits().is_empty(), "{:?}", rig.server.hits());
    assert!(!rig.env.state.join("downloads").join("p.zip").exists());

    // http:// without download.allow_http.
    let strict = Rig::with(Setup { allow_http: false, ..Setup::default() });
    let d2 = strict.start();
    let v = d2.post("/api/v1.0/download", &base.to_string());
    assert_eq!(
        v,
        json!({"code": 400, "msg": "VALIDATION_ERROR: package_url must use HTTPS protocol"})
    );
    assert_eq!(d2.progress().stage, "idle");
    assert!(rig.server.hits().is_empty());
}

// ---------------------------------------------------------------- 3. the whole story

#[test]
fn download_then_update_with_progress_status_and_reports() {
    let rig = Rig::new();
    rig.put(FACTORY);
    // 8 MiB: 5 % is larger than any single read of the daemon (256 KiB), so no 5 % step
    // can be skipped however the bytes arrive.
    let mut modules = small_modules("1.2.3");
    modules[0].content = XorShift::new(0xda3).bytes(8 << 20);
    let reference = reference_tree(FACTORY, &[("1.2.3", &modules)]);
    let pkg = build_pkg(&rig.env, "1.2.3", &modules);
    rig.server.add(&pkg);
    let size = pkg.bytes.len() as u64;
    let half = size.div_ceil(2);
    rig.server.set(|s| {
        s.chunk = 16 << 10;
        s.gate = Some(half);
    });
    // With crash points compiled in, `sleep` actions hold the install in staging and before
    // the swap long enough for polling to see it (no crash: sleep only).
    let watch_install = cfg!(feature = "failpoints");
    let d =
        rig.start_with(watch_install.then_some("stage.file=sleep(400);enter.Swapped=sleep(1000)"));
    let boot = boot_id();

    // Downloading, held at half by the server.
    assert_eq!(d.post("/api/v1.0/download", &rig.request(&pkg)), started("downloading"));
    let seen = d.watch("half of the download", |s| s.stage == "downloading" && s.progress >= 50);
    let at_half = seen.last().unwrap();
    assert_eq!(at_half.progress, 50, "the server sent exactly half: {seen:#?}");
    assert!(at_half.message.starts_with("Downloading package... "), "{at_half:?}");
    assert!(at_half.message.ends_with(&format!(" / {:.1} MB", size as f64 / 1e6)), "{at_half:?}");
    assert_eq!(d.progress().stage, "downloading", "the download waits for the server");
    rig.server.set(|s| s.gate = None);
    let mut seen2 = d.wait_stage("toInstall");
    assert_eq!(seen2.last(), Some(&snap("toInstall", 100, READY)));
    let mut all = seen.clone();
    all.append(&mut seen2);
    assert_stage_order(&all, &["idle", "downloading", "verifying", "toInstall"]);
    let dl: Vec<u64> =
        all.iter().filter(|s| s.stage == "downloading").map(|s| s.progress).collect();
    assert!(dl.windows(2).all(|w| w[0] <= w[1]), "download progress went back: {dl:?}");
    assert_eq!(
        std::fs::read(rig.downloaded(&pkg)).unwrap(),
        pkg.bytes,
        "the downloaded file is the package"
    );
    let hits = rig.server.hits();
    assert_eq!(hits.len(), 1, "one GET, no retry: {hits:?}");
    assert_eq!((hits[0].status, hits[0].range.as_deref()), (200, None));
    assert_eq!(hits[0].line, format!("GET /ota/{} HTTP/1.1", pkg.name));

    // Installing.
    assert_eq!(d.post("/api/v1.0/update", &update_body("1.2.3")), started("installing"));
    let seen = d.wait_stage("success");
    assert_eq!(seen.last(), Some(&snap("success", 100, DONE)));
    assert_stage_order(&seen, &["toInstall", "installing", "success"]);
    let inst: Vec<&Snap> = seen.iter().filter(|s| s.stage == "installing").collect();
    assert!(
        inst.windows(2).all(|w| w[0].progress <= w[1].progress),
        "install progress went back: {inst:#?}"
    );
    assert!(inst.iter().all(|s| s.progress < 100 && s.error.is_none()), "{inst:#?}");
    if watch_install {
        assert!(!inst.is_empty(), "installing never seen on /progress: {seen:#?}");
        let deploying: Vec<&&Snap> =
            inst.iter().filter(|s| s.message.starts_with("Deploying module ")).collect();
        assert!(!deploying.is_empty(), "no `Deploying module NAME (i/n)` message: {inst:#?}");
        for s in deploying {
            let ok = modules
                .iter()
                .enumerate()
                .any(|(i, m)| s.message == format!("Deploying module {} ({}/3)", m.name, i + 1));
            assert!(ok, "{s:?}");
        }
    }

    // The device.
    assert_eq!(tree(&rig.env.root), reference, "the installed tree is what the CLI installs");
    assert!(leftovers(&rig.env.root).is_empty());
    assert!(!rig.downloaded(&pkg).exists(), "the package is cleaned up after the commit");
    let st = d.status();
    assert_eq!(current_version(&st).as_deref(), Some("1.2.3"), "{st}");
    assert!(st["in_flight"].is_null(), "{st}");
    let tx = st["current"]["tx"].as_u64().unwrap_or_else(|| panic!("{st}"));
    assert_eq!(st["last"]["id"], tx, "{st}");
    assert_eq!(d.progress(), snap("success", 100, DONE), "the result is held for result_hold_s");

    // The reports.
    let got = rig.receiver.wait_for("the final report", |r| r.iter().any(|r| r["final"] == true));
    let reps = first_deliveries(&got, false);
    check_attempts(&rig.receiver);
    for r in &reps {
        check_report(r, &boot);
    }
    assert_eq!(
        stages(reps.iter().map(|r| r["stage"].as_str().unwrap())),
        ["downloading", "verifying", "toInstall", "installing", "success"],
        "{reps:#?}"
    );
    let dl: Vec<u64> = reps
        .iter()
        .filter(|r| r["stage"] == "downloading")
        .map(|r| r["progress"].as_u64().unwrap())
        .collect();
    assert_eq!(dl, (0..=100).step_by(5).collect::<Vec<u64>>(), "one download report every 5 %");
    for r in reps.iter().filter(|r| {
        r["stage"] == "downloading" || r["stage"] == "verifying" || r["stage"] == "toInstall"
    }) {
        assert!(r["tx_id"].is_null(), "a download is not a transaction: {r}");
    }
    let by_stage = |s: &str| reps.iter().filter(|r| r["stage"] == s).cloned().collect::<Vec<_>>();
    assert_eq!(
        (&by_stage("verifying")[0]["progress"], &by_stage("verifying")[0]["message"]),
        (&json!(100), &json!("Verifying package integrity..."))
    );
    assert_eq!(
        (&by_stage("toInstall")[0]["progress"], &by_stage("toInstall")[0]["message"]),
        (&json!(100), &json!(READY))
    );
    for r in by_stage("installing") {
        assert!(
            r["progress"].as_u64().unwrap() < 100 && (r["tx_id"].is_null() || r["tx_id"] == tx),
            "{r}"
        );
    }
    let finals: Vec<&Value> = reps.iter().filter(|r| r["final"] == true).collect();
    assert_eq!(finals.len(), 1, "exactly one final report: {reps:#?}");
    let f = finals[0];
    assert_eq!(
        (&f["stage"], &f["progress"], &f["message"], &f["error"], &f["tx_id"]),
        (&json!("success"), &json!(100), &json!(DONE), &Value::Null, &json!(tx))
    );
    assert_eq!(reps.last(), Some(f), "the final report is the last one");
}

// ---------------------------------------------------------------- 4. update refusals

#[test]
fn update_is_refused_before_a_download_for_another_version_and_while_busy() {
    let rig = Rig::new();
    let d = rig.start();
    let v = d.post("/api/v1.0/update", &update_body("1.0.0"));
    // A conflict names the current stage and progress at the root, as the legacy service did.
    assert_eq!(
        v,
        json!({
            "code": 409,
            "msg": "DOWNLOAD_INCOMPLETE: Cannot install, package download not completed",
            "stage": "idle",
            "progress": 0,
        })
    );

    let mut modules = small_modules("1.0.0");
    modules[0].content = XorShift::new(4).bytes(1 << 20);
    let pkg = build_pkg(&rig.env, "1.0.0", &modules);
    rig.server.add(&pkg);
    let half = (pkg.bytes.len() as u64).div_ceil(2);
    rig.server.set(|s| s.gate = Some(half));
    assert_eq!(d.post("/api/v1.0/download", &rig.request(&pkg)), started("downloading"));
    d.watch("half of the download", |s| s.progress >= 50);
    // Busy: the download job runs (held by the server).
    assert_code(
        &d.post("/api/v1.0/update", &update_body("1.0.0")),
        409,
        "OPERATION_IN_PROGRESS: ",
        "update while downloading",
    );
    // The same download again is that download (device-api repeating itself), not a conflict.
    assert_eq!(
        d.post("/api/v1.0/download", &rig.request(&pkg)),
        started("downloading"),
        "the same download again"
    );
    let other = build_pkg(&rig.env, "1.0.1", &small_modules("1.0.1"));
    let v = d.post("/api/v1.0/download", &rig.request(&other));
    assert_code(&v, 409, "OPERATION_IN_PROGRESS: ", "another download while downloading");
    assert_eq!(v["stage"], "downloading", "{v}");
    assert!(v["progress"].as_u64().is_some_and(|p| p >= 50), "{v}");
    assert_code(
        &d.json("POST", "/api/v1.0/confirm", None),
        409,
        "OPERATION_IN_PROGRESS: ",
        "confirm while downloading",
    );
    assert_eq!(d.progress().stage, "downloading");
    rig.server.set(|s| s.gate = None);
    d.wait_stage("toInstall");
    assert_eq!(
        rig.server.hits().len(),
        1,
        "one GET for the download asked for twice: {:?}",
        rig.server.hits()
    );

    // A verified package waits: another download is refused (the waiting package is kept).
    let v = d.post("/api/v1.0/download", &rig.request(&other));
    assert_code(
        &v,
        409,
        "OPERATION_IN_PROGRESS: ",
        "another download while a package waits in toInstall",
    );
    assert_eq!((&v["stage"], &v["progress"]), (&json!("toInstall"), &json!(100)), "{v}");
    assert!(rig.downloaded(&pkg).exists(), "the waiting package is kept");
    assert_code(
        &d.post("/api/v1.0/update", &update_body("1.0.1")),
        400,
        "VALIDATION_ERROR: ",
        "update of another version",
    );
    assert_eq!(d.progress(), snap("toInstall", 100, READY), "a refused update changes nothing");
    install(&d, "1.0.0");
    assert_eq!(rig.env.read("klippy/lib/klippy.py").unwrap(), b"klippy 1.0.0\n");
    // The package was consumed by the install.
    let v = d.post("/api/v1.0/update", &update_body("1.0.0"));
    assert_code(&v, 409, "DOWNLOAD_INCOMPLETE: ", "update again after the install");
}

/// A client that acts on a result at once (device-api on the `toInstall` report, the GUI on
/// `success`) must not be told the daemon is busy: once `/progress` shows a result, the job
/// that produced it must no longer count as running.
#[test]
fn commands_right_after_a_result_are_not_refused_as_busy() {
    let rig = Rig::new();
    let d = rig.start();
    for i in 0..5 {
        let version = format!("1.0.{i}");
        let pkg = build_pkg(&rig.env, &version, &small_modules(&version));
        rig.server.add(&pkg);
        assert_eq!(d.post("/api/v1.0/download", &rig.request(&pkg)), started("downloading"));
        // No pause between seeing the result and acting on it.
        let deadline = Instant::now() + PATIENCE;
        while d.progress().stage != "toInstall" {
            assert!(Instant::now() < deadline, "no toInstall");
        }
        let v = d.post("/api/v1.0/update", &update_body(&version));
        assert_eq!(
            v,
            started("installing"),
            "round {i}: POST /update right after /progress showed toInstall"
        );
        while d.progress().stage != "success" {
            assert!(Instant::now() < deadline, "no success");
        }
        let v = d.json("POST", "/api/v1.0/confirm", None);
        assert_eq!(
            v["code"], 200,
            "round {i}: POST /confirm right after /progress showed success: {v}"
        );
    }
    // The reports of each job come before those of the job started right after it.
    let got = rig
        .receiver
        .wait_for("five final reports", |r| r.iter().filter(|r| r["final"] == true).count() == 5);
    let reps = first_deliveries(&got, false);
    let one = ["downloading", "verifying", "toInstall", "installing", "success"];
    assert_eq!(
        stages(reps.iter().map(|r| r["stage"].as_str().unwrap())),
        one.repeat(5),
        "{reps:#?}"
    );
}

// ---------------------------------------------------------------- 5, 11, 12, 13, 14: download

/// A 2 MiB package for the download tests.
pub(crate) fn download_pkg(rig: &Rig, seed: u64) -> Pkg {
    let mut modules = small_modules("2.0.0");
    modules[0].content = XorShift::new(seed).bytes(2 << 20);
    let pkg = build_pkg(&rig.env, "2.0.0", &modules);
    rig.server.add(&pkg);
    pkg
}

/// Starts the download of `pkg` held by the server at half, and waits until the daemon has
/// half of it. Returns the gate offset.
pub(crate) fn download_to_half(rig: &Rig, d: &Daemon, pkg: &Pkg) -> u64 {
    let half = (pkg.bytes.len() as u64).div_ceil(2);
    rig.server.set(|s| {
        s.chunk = 16 << 10;
        s.gate = Some(half);
    });
    assert_eq!(d.post("/api/v1.0/download", &rig.request(pkg)), started("downloading"));
    d.watch("half of the download", |s| s.stage == "downloading" && s.progress >= 50);
    half
}

#[test]
fn sigkill_mid_download_resumes_with_range_at_the_next_start() {
    let rig = Rig::new();
    let pkg = download_pkg(&rig, 5);
    let half = {
        let d = rig.start();
        let half = download_to_half(&rig, &d, &pkg);
        d.sigkill();
        half
    };
    let hits = rig.server.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].range, None, "a fresh download asks for the whole package");
    rig.server.set(|s| s.gate = None);

    // The next start resumes by itself (jobs::resume_download_if_any).
    let d = rig.start();
    d.wait_stage("toInstall");
    let hits = rig.server.hits();
    assert_eq!(hits.len(), 2, "one more GET: {hits:?}");
    let n = hits[1]
        .range_start()
        .unwrap_or_else(|| panic!("the resumed GET has no `Range: bytes=N-`: {hits:?}"));
    assert!(
        n > 0 && n <= half,
        "resumed from byte {n}, the daemon had {half} when killed: {hits:?}"
    );
    assert_eq!(hits[1].status, 206);
    assert_eq!(
        std::fs::read(rig.downloaded(&pkg)).unwrap(),
        pkg.bytes,
        "the resumed file is the package"
    );
    assert_eq!(md5_hex(&std::fs::read(rig.downloaded(&pkg)).unwrap()), pkg.md5);
    // A verified package survives a crash too: the next start offers it again.
    d.sigkill();
    let d = rig.start();
    assert_eq!(
        d.progress(),
        snap("toInstall", 100, READY),
        "after a restart with a verified package"
    );
    install(&d, "2.0.0");
    assert_eq!(rig.env.read("device-api/device-api").unwrap().len(), 2 << 20);
    assert_eq!(rig.server.hits().len(), 2, "no download after the verification");
}

#[test]
fn a_connection_dropped_mid_body_is_retried_from_the_journaled_offset() {
    let rig = Rig::new();
    let pkg = download_pkg(&rig, 11);
    let drop_at = pkg.bytes.len() as u64 * 2 / 5;
    rig.server.set(|s| s.drop_at = Some(drop_at));
    let d = rig.start();
    download(&rig, &d, &pkg);
    let hits = rig.server.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    // Before a retry the daemon makes every byte it received durable and journals it.
    assert_eq!(hits[1].range_start(), Some(drop_at), "{hits:?}");
    assert_eq!(hits[1].status, 206);
    assert_eq!(std::fs::read(rig.downloaded(&pkg)).unwrap(), pkg.bytes);
}

#[test]
fn a_server_that_ignores_range_makes_the_download_start_over() {
    let rig = Rig::new();
    let pkg = download_pkg(&rig, 13);
    {
        let d = rig.start();
        download_to_half(&rig, &d, &pkg);
        d.sigkill();
    }
    rig.server.set(|s| {
        s.gate = None;
        s.ignore_range = true;
    });
    let d = rig.start();
    d.wait_stage("toInstall");
    let hits = rig.server.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert!(hits[1].range_start().is_some_and(|n| n > 0), "{hits:?}");
    assert_eq!(hits[1].status, 200, "the server answered the whole body");
    assert_eq!(std::fs::read(rig.downloaded(&pkg)).unwrap(), pkg.bytes, "no byte appended twice");
}

#[test]
fn http_503_is_retried_and_a_dead_server_fails_with_download_failed() {
    let rig = Rig::with(Setup { retries: 2, ..Setup::default() });
    let pkg = download_pkg(&rig, 12);
    rig.server.set(|s| s.fail_next = 2);
    let d = rig.start();
    download(&rig, &d, &pkg);
    let hits = rig.server.hits();
    assert_eq!(hits.iter().map(|h| h.status).collect::<Vec<_>>(), [503, 503, 200], "{hits:?}");

    // (The downloaded package is installed first: another download waits until then.)
    install(&d, "2.0.0");
    // A new package on a server that keeps failing: 1 + 2 retries, then DOWNLOAD_FAILED.
    let mut modules = small_modules("3.0.0");
    modules[0].content = XorShift::new(120).bytes(100_000);
    let pkg3 = build_pkg(&rig.env, "3.0.0", &modules);
    rig.server.add(&pkg3);
    rig.server.set(|s| s.fail_next = 1000);
    assert_eq!(d.post("/api/v1.0/download", &rig.request(&pkg3)), started("downloading"));
    let seen = d.watch("stage failed", |s| s.stage == "failed");
    let f = seen.last().unwrap();
    assert_eq!(f.code, 500, "{f:?}");
    assert!(f.message.starts_with("DOWNLOAD_FAILED: "), "{f:?}");
    assert_eq!(rig.server.hits().len(), 3 + 3, "{:?}", rig.server.hits());
    let got =
        rig.receiver.wait_for("the failed report", |r| r.iter().any(|r| r["stage"] == "failed"));
    let reps = first_deliveries(&got, false);
    let failed: Vec<&Value> = reps.iter().filter(|r| r["stage"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{reps:#?}");
    assert!(
        failed[0]["error"].as_str().is_some_and(|e| e.starts_with("DOWNLOAD_FAILED: ")),
        "{reps:#?}"
    );
    assert_eq!((&failed[0]["final"], &failed[0]["tx_id"]), (&json!(false), &Value::Null));
    assert_code(
        &d.post("/api/v1.0/update", &update_body("3.0.0")),
        409,
        "DOWNLOAD_INCOMPLETE: ",
        "update after a failed download",
    );

    // A failed download is not stuck: POSTing again once the server is back finishes it.
    rig.server.set(|s| s.fail_next = 0);
    download(&rig, &d, &pkg3);
    install(&d, "3.0.0");
}

/// Only an interrupted download (SIGTERM, crash, power cut) continues by itself at the next
/// start; one that failed stays failed until device-api asks again.
#[test]
fn a_failed_download_is_not_restarted_by_the_next_start() {
    let rig = Rig::new();
    let d = rig.start();
    let gone = json!({
        "version": "1.0.0",
        "package_url": rig.server.url("gone.zip"),
        "package_name": "gone.zip",
        "package_size": 1000,
        "package_md5": "0123456789abcdef0123456789abcdef",
    });
    assert_eq!(d.post("/api/v1.0/download", &gone.to_string()), started("downloading"));
    let f = d.watch("stage failed", |s| s.stage == "failed").pop().unwrap();
    assert!(f.message.starts_with("DOWNLOAD_FAILED: ") && f.message.contains("404"), "{f:?}");
    assert_eq!(d.sigterm().code(), Some(0));
    let d = rig.start();
    let s = d.progress();
    let pkg = download_pkg(&rig, 16);
    download(&rig, &d, &pkg);
    let gets = rig.server.hits().iter().filter(|h| h.line.contains("gone.zip")).count();
    assert_eq!(
        gets,
        1,
        "the failed URL was fetched again by the start-up: {:?}",
        rig.server.hits()
    );
    assert_ne!(s.stage, "downloading", "the start-up restarted the failed download: {s:?}");
}

#[test]
fn an_md5_mismatch_fails_and_deletes_the_file() {
    let rig = Rig::new();
    let pkg = download_pkg(&rig, 14);
    let d = rig.start();
    let mut body: Value = serde_json::from_str(&rig.request(&pkg)).unwrap();
    body["package_md5"] = json!(md5_hex(b"something else"));
    assert_eq!(d.post("/api/v1.0/download", &body.to_string()), started("downloading"));
    let seen = d.watch("stage failed", |s| s.stage == "failed");
    let f = seen.last().unwrap();
    assert_eq!((f.code, f.progress), (500, 100), "{f:?}");
    assert!(
        f.message.starts_with(&format!("MD5_MISMATCH: expected {}", md5_hex(b"something else"))),
        "{f:?}"
    );
    assert!(!rig.downloaded(&pkg).exists(), "the file is deleted");
    let got =
        rig.receiver.wait_for("the failed report", |r| r.iter().any(|r| r["stage"] == "failed"));
    let reps = first_deliveries(&got, false);
    assert!(
        reps.last().unwrap()["error"].as_str().is_some_and(|e| e.starts_with("MD5_MISMATCH: ")),
        "{reps:#?}"
    );
    assert_code(
        &d.post("/api/v1.0/update", &update_body("2.0.0")),
        409,
        "DOWNLOAD_INCOMPLETE: ",
        "update after an MD5 mismatch",
    );
}

// ---------------------------------------------------------------- 6. SIGKILL mid-install

/// Without the crash points these tests do not exist: fail, and say so, rather than pass
/// silently with fewer tests.
#[cfg(not(feature = "failpoints"))]
#[test]
fn daemon_kill_and_sigterm_tests_need_the_failpoints_feature() {
    panic!(
        "the daemon's SIGKILL and SIGTERM tests need the named crash points compiled in: \
         run `cargo test --features failpoints --test it daemon`"
    );
}

/// A device holding the factory tree, the 2.0.0 package on its server: the rig, the tree
/// now (checked against the oracle's model of the factory), the tree the install must leave
/// (from the package rules, `reference_tree`), and the package.
#[cfg(feature = "failpoints")]
fn factory_with_v2_served() -> (Rig, BTreeMap<String, String>, BTreeMap<String, String>, Pkg) {
    let rig = Rig::new();
    rig.put(FACTORY);
    let modules = small_modules("2.0.0");
    let old = tree(&rig.env.root);
    assert_eq!(old, reference_tree(FACTORY, &[]), "the oracle's model of the factory tree");
    let new = reference_tree(FACTORY, &[("2.0.0", &modules)]);
    let pkg = build_pkg(&rig.env, "2.0.0", &modules);
    rig.server.add(&pkg);
    (rig, old, new, pkg)
}

/// Installs through the daemon, which SIGKILLs itself at the `hit`-th pass through crash
/// point `point`; the next start's recovery must leave every file old or every file new,
/// show that result on /progress and /status, and send exactly one final report for the
/// transaction.
#[cfg(feature = "failpoints")]
pub(crate) fn sigkill_mid_install(point: &str, hit: u32) {
    let ctx = format!("SIGKILL at {point} (pass {hit})");
    let (rig, old, new, pkg) = factory_with_v2_served();
    {
        let d = rig.start_with(Some(&kill_at(point, hit)));
        download(&rig, &d, &pkg);
        // The crash may beat the answer.
        match d.try_request("POST", "/api/v1.0/update", Some(&update_body("2.0.0"))) {
            Ok((200, _, text)) => assert_eq!(
                serde_json::from_str::<Value>(&text).unwrap(),
                started("installing"),
                "{ctx}"
            ),
            Ok(other) => panic!("{ctx}: POST /update answered {other:?}"),
            Err(_) => {}
        }
        let st = d.wait_exit();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(9),
            "{ctx}: the daemon should die at the crash point: {st}\n{}",
            d.log_text()
        );
        assert!(d.log_text().contains(&format!("crash point {point}: SIGKILL")), "{ctx}");
    }

    let d = rig.start();
    // The first /progress after the restart already shows what recovery did.
    let s = d.progress();
    let files = tree(&rig.env.root);
    let new_side = if files == new {
        true
    } else if files == old {
        false
    } else {
        panic!(
            "{ctx}: the tree is neither all old nor all new:\nlive {files:#?}\n\
             old {old:#?}\nnew {new:#?}"
        )
    };
    assert!(leftovers(&rig.env.root).is_empty(), "{ctx}");
    let st = d.status();
    assert!(st["in_flight"].is_null(), "{ctx}: {st}");
    let tx =
        st["last"]["id"].as_u64().unwrap_or_else(|| panic!("{ctx}: no last transaction: {st}"));
    assert_eq!(current_version(&st).as_deref(), new_side.then_some("2.0.0"), "{ctx}: {st}");
    // Checked before the marker, which replaces the download record.
    let package_left = rig.downloaded(&pkg).exists();
    let got = rig.marker(&d);
    let reps = first_deliveries(&got, true);
    let finals = finals_for(&reps, tx);
    assert_eq!(finals.len(), 1, "{ctx}: exactly one final report for tx {tx}: {reps:#?}");
    assert_eq!(finals[0]["stage"], if new_side { "success" } else { "failed" }, "{ctx}: {reps:#?}");
    assert!(
        reps.iter().filter(|r| r["final"] == true).all(|r| r["tx_id"] == tx),
        "{ctx}: a final report for another tx: {reps:#?}"
    );
    let boot = boot_id();
    for r in &reps {
        check_report(r, &boot);
    }
    if new_side {
        assert_eq!(
            s,
            snap("success", 100, DONE),
            "{ctx}: files are new, /progress after the restart"
        );
        assert!(
            !package_left,
            "{ctx}: the install committed, but its package is still in downloads/ \
             (SPEC §3: cleaned up at the commit)"
        );
    } else {
        assert_eq!(
            (s.code, s.stage.as_str()),
            (500, "failed"),
            "{ctx}: files are old, /progress after the restart: {s:?}"
        );
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_while_staging_is_resolved_at_the_next_start() {
    sigkill_mid_install("stage.file", 1);
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_mid_swap_is_finished_at_the_next_start() {
    sigkill_mid_install("swap.file", 2);
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_right_after_the_commit_reports_success_at_the_next_start() {
    sigkill_mid_install("enter.Committed", 1);
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_during_the_commit_cleanup_reports_success_at_the_next_start() {
    sigkill_mid_install("commit.cleaned", 1);
}

/// A report device-api answered leaves the outbox only after the answer: SIGKILL between the
/// two (`outbox.delivered`) delivers it again after the restart, with the same seq and body;
/// SIGKILL right after its removal (`outbox.acked`) never does. Either kill takes the daemon
/// down in the middle of an install (held at `Swapped`): after the restart no report is
/// missing or out of order, and exactly one final report says how the install ended, matching
/// the tree.
#[cfg(feature = "failpoints")]
#[test]
fn sigkill_inside_report_delivery_loses_no_report_and_redelivers_only_one_not_yet_removed() {
    for (point, times_seen) in [("outbox.delivered", 2), ("outbox.acked", 1)] {
        let ctx = format!("SIGKILL at {point}");
        let (rig, old, new, pkg) = factory_with_v2_served();
        {
            // Downloaded by an unarmed daemon, its reports delivered (and, a moment later,
            // removed from the outbox) before it stops.
            let d = rig.start();
            download(&rig, &d, &pkg);
            rig.receiver
                .wait_for("the toInstall report", |r| r.iter().any(|r| r["stage"] == "toInstall"));
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(d.sigterm().code(), Some(0), "{ctx}");
        }
        let before = rig.receiver.reports().len();
        {
            // Reports are queued at stage changes: during an install only "Preparing
            // installation" (queued before the transaction is journaled) and the final one. With
            // device-api down, the first waits in the outbox until the install is held at
            // Swapped; device-api back, its delivery is the first (the crash point) and lands
            // while the transaction is in flight.
            let d =
                rig.start_with(Some(&format!("{};enter.Swapped=sleep(8000)", kill_at(point, 1))));
            rig.receiver.down();
            assert_eq!(
                d.post("/api/v1.0/update", &update_body("2.0.0")),
                started("installing"),
                "{ctx}"
            );
            wait_until(
                || format!("{ctx}: the install to be held at Swapped"),
                || Some(()).filter(|()| d.status()["in_flight"]["phase"] == "Swapped"),
            );
            rig.receiver.up();
            let st = d.wait_exit();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&st),
                Some(9),
                "{ctx}: {st}\n{}",
                d.log_text()
            );
            assert!(d.log_text().contains(&format!("crash point {point}: SIGKILL")), "{ctx}");
        }
        let got_at_kill = rig.receiver.reports();
        assert_eq!(
            got_at_kill.len(),
            before + 1,
            "{ctx}: exactly one report was answered before the kill: {got_at_kill:#?}"
        );
        // The kill landed inside the install: the journal (read by the CLI) holds it in flight.
        let between = rig.env.run(&["status", "--json"]).json();
        assert_eq!(
            between["in_flight"]["kind"], "install",
            "{ctx}: the install was in flight at the kill: {between}"
        );
        let killed = got_at_kill[before].clone();
        assert_eq!(
            (&killed["stage"], &killed["final"]),
            (&json!("installing"), &json!(false)),
            "{ctx}: {killed}"
        );

        let d = rig.start();
        let got = rig.marker(&d);
        let seen = got.iter().filter(|r| r["seq"] == killed["seq"]).count();
        assert_eq!(
            seen, times_seen,
            "{ctx}: report seq {} reached device-api {seen} times: {got:#?}",
            killed["seq"]
        );
        // Every seq from 1 on, in order, a repeat only with the same body.
        let reps = first_deliveries(&got, true);
        let st = d.status();
        assert!(st["in_flight"].is_null(), "{ctx}: {st}");
        let tx = st["last"]["id"].as_u64().unwrap();
        let finals = finals_for(&reps, tx);
        assert_eq!(finals.len(), 1, "{ctx}: exactly one final report for tx {tx}: {reps:#?}");
        let files = tree(&rig.env.root);
        let expected_stage = if files == new {
            "success"
        } else {
            assert_eq!(files, old, "{ctx}: neither all old nor all new");
            "failed"
        };
        assert_eq!(
            finals[0]["stage"], expected_stage,
            "{ctx}: the final report matches the tree: {reps:#?}"
        );
    }
}

// ---------------------------------------------------------------- 7. receiver down

#[test]
fn reports_wait_in_the_outbox_while_device_api_is_down() {
    let rig = Rig::new();
    rig.put(FACTORY);
    let pkg = build_pkg(&rig.env, "1.1.0", &small_modules("1.1.0"));
    rig.server.add(&pkg);
    let d = rig.start();
    download(&rig, &d, &pkg);
    rig.receiver.wait_for("the toInstall report", |r| r.iter().any(|r| r["stage"] == "toInstall"));
    let before = rig.receiver.attempts().len();

    // device-api is down (being replaced, say) for the whole install: the install goes on.
    rig.receiver.down();
    install(&d, "1.1.0");
    assert_eq!(rig.env.read("voice-app/voice-app").unwrap(), b"voice-app 1.1.0\n");
    // The undelivered reports are kept across a restart of the daemon.
    assert_eq!(d.sigterm().code(), Some(0), "{}", d.log_text());
    let d = rig.start();
    assert_eq!(
        rig.receiver.attempts().len(),
        before,
        "nothing can arrive while the port is closed"
    );
    rig.receiver.up();
    let got = rig.receiver.wait_for("the final report", |r| r.iter().any(|r| r["final"] == true));
    let reps = first_deliveries(&got, false);
    assert_eq!(
        stages(reps.iter().map(|r| r["stage"].as_str().unwrap())),
        ["downloading", "verifying", "toInstall", "installing", "success"],
        "{reps:#?}"
    );
    assert_eq!(reps.last().unwrap()["final"], true);

    // A receiver that answers `code 500` has not acknowledged: the same report comes again.
    rig.receiver.nack_next(2);
    let got = rig.marker(&d);
    let reps = first_deliveries(&got, false);
    let nacked: Vec<Attempt> = rig.receiver.attempts().into_iter().filter(|a| !a.acked).collect();
    assert_eq!(nacked.len(), 2);
    assert_eq!(nacked[0].body, nacked[1].body, "retried as is");
    assert!(reps.contains(&nacked[0].body), "then acknowledged once: {reps:#?}");
    check_attempts(&rig.receiver);
}

// ---------------------------------------------------------------- 8. SIGTERM

#[test]
fn sigterm_when_idle_exits_0() {
    let rig = Rig::new();
    let d = rig.start();
    assert_eq!(d.progress().stage, "idle");
    let st = d.sigterm();
    assert_eq!(st.code(), Some(0), "{st}\n{}", d.log_text());
}

#[test]
fn sigterm_mid_download_exits_0_and_the_next_start_resumes() {
    let rig = Rig::new();
    let pkg = download_pkg(&rig, 8);
    let half = {
        let d = rig.start();
        let half = download_to_half(&rig, &d, &pkg);
        // SIGTERM, then let bytes trickle so the blocked read returns and the daemon sees it.
        kill(Pid::from_raw(d.pid), Signal::SIGTERM).unwrap();
        rig.server.set(|s| {
            s.gate = None;
            s.chunk = 4096;
            s.delay = Duration::from_millis(20);
        });
        let st = d.wait_exit();
        assert_eq!(st.code(), Some(0), "{st}\n{}", d.log_text());
        half
    };
    rig.server.set(|s| *s = Serve::default());
    let d = rig.start();
    d.wait_stage("toInstall");
    let hits = rig.server.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    let n =
        hits[1].range_start().unwrap_or_else(|| panic!("no Range on the resumed GET: {hits:?}"));
    // On SIGTERM every byte received is made durable and journaled before the exit.
    assert!(
        n >= half,
        "resumed from {n}, but {half} bytes had arrived before the SIGTERM: {hits:?}"
    );
    assert_eq!(std::fs::read(rig.downloaded(&pkg)).unwrap(), pkg.bytes);
}

#[cfg(feature = "failpoints")]
#[test]
fn sigterm_mid_install_exits_0_and_the_next_start_finishes_it() {
    let (rig, old, new, pkg) = factory_with_v2_served();
    {
        // Held for a while right after the backup is journaled: the SIGTERM lands there.
        let d = rig.start_with(Some("enter.BackedUp=sleep(3000)"));
        download(&rig, &d, &pkg);
        assert_eq!(d.post("/api/v1.0/update", &update_body("2.0.0")), started("installing"));
        // Staging done (75 %): the install sleeps at the BackedUp boundary.
        d.watch("the install past staging", |s| s.stage == "installing" && s.progress >= 75);
        let st = d.sigterm();
        assert_eq!(st.code(), Some(0), "{st}\n{}", d.log_text());
    }
    // The daemon stopped between two steps of the install: the journal (read by the CLI, no
    // daemon running) holds it in flight, backed up and not yet swapped, and the tree is
    // still all old.
    let between = rig.env.run(&["status", "--json"]);
    let between = between.json();
    let flying = &between["in_flight"];
    assert_eq!(flying["kind"], "install", "a transaction was in flight after SIGTERM: {between}");
    assert_eq!(flying["to_version"], "2.0.0", "{between}");
    assert_eq!(
        flying["phase"], "BackedUp",
        "SIGTERM lands while the install is held at BackedUp: {between}"
    );
    let mid = tree(&rig.env.root);
    for (path, was) in &old {
        assert_eq!(mid.get(path), Some(was), "{path} was swapped before the restart: {mid:#?}");
    }
    for (path, what) in mid.iter().filter(|(p, _)| !old.contains_key(*p)) {
        let staged = path.rsplit('/').next().unwrap_or("").starts_with(".tope-");
        assert!(
            staged || what.starts_with("dir "),
            "only staged files and their directories are new before the swap: {path} {what}"
        );
    }
    // The next start's recovery resumes it (recovery = "resume", the default) to the end.
    let d = rig.start();
    let s = d.progress();
    let st = d.status();
    assert!(st["in_flight"].is_null(), "{st}");
    let tx = st["last"]["id"].as_u64().unwrap();
    assert_eq!(
        flying["tx"].as_u64(),
        Some(tx),
        "the transaction that finished is the one the SIGTERM interrupted: {st}"
    );
    assert_eq!(tree(&rig.env.root), new, "the resumed install left all new content");
    assert_eq!(current_version(&st).as_deref(), Some("2.0.0"), "{st}");
    assert_eq!(s, snap("success", 100, DONE));
    let got = rig.marker(&d);
    let reps = first_deliveries(&got, true);
    assert_eq!(finals_for(&reps, tx).len(), 1, "{reps:#?}");
}

// ---------------------------------------------------------------- 9. rollback, confirm

#[test]
fn rollback_through_the_api_restores_the_previous_version() {
    let rig = Rig::new();
    rig.put(FACTORY);
    let v1 = build_pkg(&rig.env, "1.0.0", &small_modules("1.0.0"));
    let path = rig.env.pkg_path(&v1.name);
    std::fs::write(&path, &v1.bytes).unwrap();
    rig.env.ok(&["install", path.to_str().unwrap()]);
    let at_v1 = tree(&rig.env.root);
    let v2 = build_pkg(&rig.env, "2.0.0", &small_modules("2.0.0"));
    rig.server.add(&v2);

    let d = rig.start();
    download(&rig, &d, &v2);
    install(&d, "2.0.0");
    assert_eq!(rig.env.read("klippy/lib/klippy.py").unwrap(), b"klippy 2.0.0\n");
    assert_eq!(d.post("/api/v1.0/rollback", "{}"), started("installing"));
    let seen = d.watch("the rollback's success", |s| {
        s.stage == "success" && s.message.starts_with("Rolled back")
    });
    assert_eq!(seen.last(), Some(&snap("success", 100, "Rolled back to 1.0.0")));
    assert_eq!(tree(&rig.env.root), at_v1, "the 1.0.0 files are back");
    let st = d.status();
    assert_eq!(current_version(&st).as_deref(), Some("1.0.0"), "{st}");
    assert!(st["in_flight"].is_null(), "{st}");
    let tx = st["last"]["id"].as_u64().unwrap();
    let got =
        rig.receiver.wait_for("the rollback's final report", |r| !finals_for(r, tx).is_empty());
    let reps = first_deliveries(&got, false);
    let f = finals_for(&reps, tx);
    assert_eq!(f.len(), 1, "{reps:#?}");
    assert_eq!(
        (&f[0]["stage"], &f[0]["message"]),
        (&json!("success"), &json!("Rolled back to 1.0.0"))
    );

    let v = d.post("/api/v1.0/confirm", "");
    assert_eq!(v, json!({"code": 200, "msg": "success", "data": {"result": "nothing_to_confirm"}}));
}

#[test]
fn rollback_with_nothing_installed_is_404_and_confirm_has_nothing_to_confirm() {
    let rig = Rig::new();
    rig.put(FACTORY);
    let before = tree(&rig.env.root);
    let d = rig.start();
    assert_code(
        &d.post("/api/v1.0/rollback", "{}"),
        404,
        "NOTHING_TO_ROLL_BACK: ",
        "rollback on a fresh device",
    );
    assert_code(
        &d.json("POST", "/api/v1.0/rollback", None),
        404,
        "NOTHING_TO_ROLL_BACK: ",
        "rollback without a body",
    );
    assert_code(
        &d.post("/api/v1.0/rollback", r#"{"to":"factory"}"#),
        404,
        "NOTHING_TO_ROLL_BACK: ",
        "rollback to factory",
    );
    assert_code(
        &d.post("/api/v1.0/rollback", r#"{"to":"sideways"}"#),
        400,
        "VALIDATION_ERROR: ",
        "rollback to nonsense",
    );
    // A body that is not an object is refused, not read as a rollback with no `to` (serde
    // reads a struct from an array; schemathesis found `[null]` answered 404).
    for body in ["[null]", "[]", r#"["factory"]"#, "null", "3", r#""factory""#] {
        assert_code(
            &d.post("/api/v1.0/rollback", body),
            400,
            "VALIDATION_ERROR: ",
            &format!("rollback with body {body}"),
        );
    }
    assert_code(
        &d.post("/api/v1.0/update", r#"["1.2.3"]"#),
        400,
        "VALIDATION_ERROR: ",
        "update with an array body",
    );
    let v = d.json("POST", "/api/v1.0/confirm", None);
    assert_eq!(v, json!({"code": 200, "msg": "success", "data": {"result": "nothing_to_confirm"}}));
    assert_eq!(d.progress().stage, "idle");
    assert_eq!(tree(&rig.env.root), before);
}

// ---------------------------------------------------------------- 10. the CLI beside the daemon

#[test]
fn the_cli_reads_status_and_is_refused_transactions_while_the_daemon_runs() {
    let rig = Rig::new();
    rig.put(FACTORY);
    let v1 = build_pkg(&rig.env, "1.0.0", &small_modules("1.0.0"));
    let p1 = rig.env.pkg_path(&v1.name);
    std::fs::write(&p1, &v1.bytes).unwrap();
    rig.env.ok(&["install", p1.to_str().unwrap()]);
    let v2 = build_pkg(&rig.env, "2.0.0", &small_modules("2.0.0"));
    let p2 = rig.env.pkg_path(&v2.name);
    std::fs::write(&p2, &v2.bytes).unwrap();
    let before = tree(&rig.env.root);

    let d = rig.start();
    let shown = d.progress();
    let api = d.status();
    let r = rig.env.run(&["status", "--json"]);
    assert_eq!(r.code, Some(0), "`status --json` while the daemon runs:\n{}", r.describe());
    let cli = r.json();
    assert_eq!(current_version(&cli).as_deref(), Some("1.0.0"), "{cli}");
    assert_eq!(
        (&cli["current"], &cli["in_flight"], &cli["generations"]),
        (&api["current"], &api["in_flight"], &api["generations"])
    );

    let r = rig.env.run(&["install", p2.to_str().unwrap()]);
    assert_eq!(r.code, Some(6), "`install` while the daemon runs:\n{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("OPERATION_IN_PROGRESS"), "{}", r.describe());
    assert_eq!(tree(&rig.env.root), before, "nothing touched");
    assert_eq!(d.progress(), shown, "the daemon is unaffected");
    assert_eq!(current_version(&d.status()).as_deref(), Some("1.0.0"));
}

// ---------------------------------------------------------------- more of the legacy contract

#[test]
fn a_result_is_held_for_result_hold_s_then_progress_is_idle() {
    let rig = Rig::with(Setup { result_hold_s: 2, ..Setup::default() });
    let pkg = build_pkg(&rig.env, "1.0.0", &small_modules("1.0.0"));
    rig.server.add(&pkg);
    let d = rig.start();
    download(&rig, &d, &pkg);
    let before = d.progress();
    assert_eq!(d.post("/api/v1.0/update", &update_body("1.0.0")), started("installing"));
    // `success` may come and go between two polls on a loaded machine: the final report
    // proves it was reached.
    let seen = d.watch_after(Some(&before), "idle after the result", |s| s.stage == "idle");
    assert_stage_order(&seen, &["toInstall", "installing", "success", "idle"]);
    rig.receiver.wait_for("the final success report", |r| {
        r.iter().any(|r| r["final"] == true && r["stage"] == "success")
    });
    let st = d.status();
    assert_eq!(
        current_version(&st).as_deref(),
        Some("1.0.0"),
        "the last result stays in /status: {st}"
    );
    assert_eq!(st["last"]["to_version"], "1.0.0", "{st}");
}

#[test]
fn the_same_download_request_again_is_answered_from_disk() {
    let rig = Rig::new();
    let pkg = download_pkg(&rig, 15);
    let d = rig.start();
    download(&rig, &d, &pkg);
    download(&rig, &d, &pkg);
    assert_eq!(
        rig.server.hits().len(),
        1,
        "a verified identical download is not fetched again: {:?}",
        rig.server.hits()
    );
    assert_eq!(std::fs::read(rig.downloaded(&pkg)).unwrap(), pkg.bytes);
}

#[test]
fn update_after_the_trust_window_is_410_package_expired() {
    let rig = Rig::with(Setup { trust_window_h: 0, ..Setup::default() });
    let pkg = build_pkg(&rig.env, "1.0.0", &small_modules("1.0.0"));
    rig.server.add(&pkg);
    let d = rig.start();
    download(&rig, &d, &pkg);
    let v = d.post("/api/v1.0/update", &update_body("1.0.0"));
    assert_code(&v, 410, "PACKAGE_EXPIRED: Package verified at ", "update after the trust window");
    assert!(v["msg"].as_str().unwrap().ends_with("please re-download"), "{v}");
    assert!(rig.env.read("klippy/lib/klippy.py").is_none(), "nothing installed");
    // An expired package can never be installed: it does not stay on the device.
    assert!(!rig.downloaded(&pkg).exists(), "the expired package is removed");

    // Expired while the daemon was down: the start-up removes it.
    let pkg2 = build_pkg(&rig.env, "1.0.1", &small_modules("1.0.1"));
    rig.server.add(&pkg2);
    download(&rig, &d, &pkg2);
    assert!(rig.downloaded(&pkg2).exists());
    d.sigkill();
    let d = rig.start();
    assert!(!rig.downloaded(&pkg2).exists(), "the start-up removed the expired package");
    assert_eq!(d.progress().stage, "idle");
}

#[test]
fn a_package_refused_before_the_transaction_is_a_failed_stage_and_report() {
    let rig = Rig::new();
    rig.put(FACTORY);
    let before = tree(&rig.env.root);
    let outside = rig.env.tmp.path().join("outside/evil");
    let pkg = build_pkg_with(&rig.env, "1.0.0", &small_modules("1.0.0"), |m| {
        m["modules"][2]["dst"] = json!(outside.to_str().unwrap());
    });
    rig.server.add(&pkg);
    let d = rig.start();
    download(&rig, &d, &pkg);
    assert_eq!(d.post("/api/v1.0/update", &update_body("1.0.0")), started("installing"));
    let seen = d
        .watch_after(Some(&snap("toInstall", 100, READY)), "stage failed", |s| s.stage == "failed");
    let f = seen.last().unwrap();
    assert_eq!(f.code, 500, "{f:?}");
    // The legacy clients' code, the fine-grained one inside the text.
    assert!(f.message.starts_with("DEPLOYMENT_FAILED: PATH_NOT_ALLOWED: "), "{f:?}");
    assert_eq!(tree(&rig.env.root), before, "nothing touched");
    assert!(!outside.exists());
    let got =
        rig.receiver.wait_for("the failed report", |r| r.iter().any(|r| r["stage"] == "failed"));
    let reps = first_deliveries(&got, false);
    let failed = reps.last().unwrap();
    assert_eq!(
        (&failed["stage"], &failed["error"]),
        (&json!("failed"), &json!(f.message)),
        "{reps:#?}"
    );
    assert!(d.status()["in_flight"].is_null());
}

#[test]
fn an_install_that_fails_mid_transaction_is_rolled_back_and_reported_once() {
    let rig = Rig::new();
    rig.put(FACTORY);
    let before = tree(&rig.env.root);
    let pkg = build_pkg_with(&rig.env, "1.0.0", &small_modules("1.0.0"), |m| {
        m["modules"][0]["post_cmds"] = json!(["exit 3"]);
    });
    rig.server.add(&pkg);
    let d = rig.start();
    download(&rig, &d, &pkg);
    assert_eq!(d.post("/api/v1.0/update", &update_body("1.0.0")), started("installing"));
    let seen = d
        .watch_after(Some(&snap("toInstall", 100, READY)), "stage failed", |s| s.stage == "failed");
    let f = seen.last().unwrap();
    assert_eq!(f.code, 500, "{f:?}");
    // The legacy clients' code, the fine-grained one inside the text; alone in /status.
    assert!(f.message.starts_with("DEPLOYMENT_FAILED: POST_CMD_FAILED: "), "{f:?}");
    assert_eq!(tree(&rig.env.root), before, "rolled back: every file old");
    let st = d.status();
    assert_eq!(st["last"]["error"]["code"], "POST_CMD_FAILED", "{st}");
    assert!(st["in_flight"].is_null() && st["current"].is_null(), "{st}");
    let tx = st["last"]["id"].as_u64().unwrap_or_else(|| panic!("{st}"));
    let got = rig.receiver.wait_for("the final report", |r| !finals_for(r, tx).is_empty());
    let reps = first_deliveries(&got, false);
    let finals = finals_for(&reps, tx);
    assert_eq!(finals.len(), 1, "{reps:#?}");
    assert_eq!(
        (&finals[0]["stage"], &finals[0]["error"]),
        (&json!("failed"), &json!(f.message)),
        "{reps:#?}"
    );
    assert_eq!(
        reps.iter().filter(|r| r["stage"] == "failed").count(),
        1,
        "one failed report: {reps:#?}"
    );
}

/// A transaction the daemon did not see end (the CLI ran it, or a crash came right after its
/// commit) is shown and reported once at the next start, as what it was.
#[test]
fn a_rollback_the_cli_ran_is_shown_and_reported_once_at_the_next_start() {
    let rig = Rig::new();
    rig.put(FACTORY);
    for v in ["1.0.0", "2.0.0"] {
        let pkg = build_pkg(&rig.env, v, &small_modules(v));
        let path = rig.env.pkg_path(&pkg.name);
        std::fs::write(&path, &pkg.bytes).unwrap();
        rig.env.ok(&["install", path.to_str().unwrap()]);
    }
    rig.env.ok(&["rollback"]);
    let d = rig.start();
    let st = d.status();
    assert_eq!(current_version(&st).as_deref(), Some("1.0.0"), "{st}");
    let tx = st["last"]["id"].as_u64().unwrap();
    let shown = d.progress();
    let got = rig.marker(&d);
    let reps = first_deliveries(&got, false);
    let finals: Vec<&Value> = reps.iter().filter(|r| r["final"] == true).collect();
    assert_eq!(finals.len(), 1, "only the last transaction's end is reported: {reps:#?}");
    let last = finals[0].clone();
    // A restart does not report it again.
    assert_eq!(d.sigterm().code(), Some(0));
    let d = rig.start();
    let got = rig.marker(&d);
    assert_eq!(
        first_deliveries(&got, false).iter().filter(|r| r["final"] == true).count(),
        1,
        "{got:#?}"
    );
    assert_eq!((&last["tx_id"], &last["stage"]), (&json!(tx), &json!("success")), "{last}");
    assert_eq!(shown, snap("success", 100, "Rolled back to 1.0.0"), "/progress at the start");
    assert_eq!(last["message"], "Rolled back to 1.0.0", "the final report: {last}");
}
