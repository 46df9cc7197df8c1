//! The reporter (SPEC §5): delivers the durable report outbox (`journal::outbox`) to
//! device-api's `POST /ota/report` (contracts/device-api-callbacks.yaml), in `seq` order, one
//! report at a time, retrying with capped exponential backoff until the receiver acknowledges.
//!
//! **Architecture invariant:** the reporter never blocks the update. It runs on its own std
//! thread and holds no lock and no journal transaction while it talks HTTP; job threads push
//! with one short commit (`Journal::outbox_push*`) and then call `Reporter::notify`.
//!
//! The delivery rules (ordering, retry, acknowledgement, restarts) are normative in
//! journal-format.md §5.6. What a response means is the pure function `judge_response`.

use crate::config::Config;
use crate::journal::Journal;
use crate::limits::REPORT_RESPONSE_BYTES_MAX;
use crate::wakeup::{Wakeup, Worker};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// First retry delay after a failed delivery; doubles per failure up to `REPORT_BACKOFF_MAX_MS`.
pub const REPORT_BACKOFF_BASE_MS: u64 = 500;
pub const REPORT_BACKOFF_MAX_MS: u64 = 30_000;
/// Connecting to the receiver (loopback: refused or accepted at once).
pub const REPORT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// One whole POST, connect to last response byte (the contract asks device-api for < 500 ms).
pub const REPORT_TIMEOUT_MS: u64 = 5_000;
/// With an empty outbox the reporter looks again this often even without `notify`.
pub const REPORT_IDLE_POLL_MS: u64 = 5_000;
/// Reports read from the journal per batch.
pub const REPORT_BATCH_MAX: usize = 64;

pub use crate::journal::outbox::Report;

impl Report {
    /// A report of the current boot, not tied to a transaction (`with_tx` ties it).
    pub fn new(
        stage: &str,
        progress: u8,
        message: impl Into<String>,
        error: Option<String>,
    ) -> Report {
        let boot_id = crate::clock::boot_id().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "boot id unreadable; reports say \"unknown\"");
            "unknown".into()
        });
        Report {
            stage: stage.into(),
            progress,
            message: message.into(),
            error,
            tx: None,
            boot_id,
            seq: 0,
            final_report: false,
            version: None,
        }
    }

    pub fn with_tx(mut self, tx: u64) -> Report {
        self.tx = Some(tx);
        self
    }
}

/// The JSON body POSTed for `r`: the contract's `ReportPayload` (`error` is `null` when
/// absent), `version` as the Python service sent it (`"v1.2.3"`, or `null` when unknown), plus
/// the extra fields `tx_id` (number or `null`), `boot_id`, `seq` and `final`.
#[derive(Serialize)]
struct Body<'a> {
    stage: &'a str,
    progress: u8,
    message: &'a str,
    error: Option<&'a str>,
    version: Option<String>,
    tx_id: Option<u64>,
    boot_id: &'a str,
    seq: u64,
    #[serde(rename = "final")]
    final_report: bool,
}

pub fn body_json(r: &Report) -> Vec<u8> {
    let body = Body {
        stage: &r.stage,
        progress: r.progress.min(100),
        message: &r.message,
        error: r.error.as_deref(),
        version: r.version.as_ref().map(|v| format!("v{v}")),
        tx_id: r.tx,
        boot_id: &r.boot_id,
        seq: r.seq,
        final_report: r.final_report,
    };
    // Serialising plain strings and integers cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// What a delivery attempt means for the report at the head of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The receiver has it: remove it from the outbox.
    Acknowledged,
    /// The receiver refuses this report and will refuse it again: remove it (logged as an
    /// error) so it cannot block every later report.
    Rejected(String),
    /// Not delivered (receiver down, slow, failing): keep it at the head, retry after backoff.
    RetryLater(String),
}

/// Judges the receiver's answer (journal-format.md §5.6):
/// - HTTP 2xx with the contract's envelope `{code, msg}`: `code` 200 acknowledges; a `code` in
///   400..=499 (the contract's 400 `VALIDATION_ERROR`) rejects; any other `code` (the
///   contract's 500 `INTERNAL_ERROR`) is retried. A 2xx body that is not such an envelope
///   acknowledges: the HTTP 2xx is the receipt ("device-api only needs to acknowledge receipt").
/// - HTTP 408 and 429 are retried (the receiver asks for a later attempt).
/// - Any other HTTP 4xx rejects: the contract never answers 4xx at the HTTP level, so a 4xx
///   says this request as sent is unacceptable to whatever answered, and resending the same
///   bytes cannot change that.
/// - Everything else (5xx, 3xx: redirects are not followed, 1xx) is retried.
pub fn judge_response(status: u16, body: &str) -> Verdict {
    match status {
        200..=299 => match envelope(body) {
            None | Some((200, _)) => Verdict::Acknowledged,
            Some((code @ 400..=499, msg)) => {
                Verdict::Rejected(format!("HTTP {status}, code {code}: {msg}"))
            }
            Some((code, msg)) => Verdict::RetryLater(format!("HTTP {status}, code {code}: {msg}")),
        },
        408 | 429 => Verdict::RetryLater(format!("HTTP {status}: {}", excerpt(body))),
        400..=499 => Verdict::Rejected(format!("HTTP {status}: {}", excerpt(body))),
        _ => Verdict::RetryLater(format!("HTTP {status}: {}", excerpt(body))),
    }
}

/// `(code, msg)` of a `{code, msg, ...}` JSON object.
fn envelope(body: &str) -> Option<(i64, String)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let code = v.get("code")?.as_i64()?;
    Some((code, excerpt(v.get("msg").and_then(|m| m.as_str()).unwrap_or(""))))
}

fn excerpt(s: &str) -> String {
    s.chars().take(200).collect()
}

/// The delay after the next failure, given the delay used after this one.
pub fn next_backoff(current: Duration, max: Duration) -> Duration {
    current.saturating_mul(2).min(max)
}

/// How the reporter runs; production values are the `REPORT_*` constants.
#[derive(Debug, Clone)]
struct Settings {
    url: String,
    backoff_base: Duration,
    backoff_max: Duration,
    connect_timeout: Duration,
    timeout: Duration,
    idle_poll: Duration,
    batch: usize,
}

impl Settings {
    fn new(url: String) -> Settings {
        Settings {
            url,
            backoff_base: Duration::from_millis(REPORT_BACKOFF_BASE_MS),
            backoff_max: Duration::from_millis(REPORT_BACKOFF_MAX_MS),
            connect_timeout: Duration::from_millis(REPORT_CONNECT_TIMEOUT_MS),
            timeout: Duration::from_millis(REPORT_TIMEOUT_MS),
            idle_poll: Duration::from_millis(REPORT_IDLE_POLL_MS),
            batch: REPORT_BATCH_MAX,
        }
    }
}

/// Delivers the outbox on its own thread until `stop` (or a journal error, which ends it: the
/// reports stay in the journal for the next start).
pub struct Reporter {
    worker: Worker,
}

impl Reporter {
    /// Starts delivering to `cfg.reporter.url`.
    pub fn start(journal: Arc<Journal>, cfg: &Config) -> Reporter {
        Reporter::start_with(journal, Settings::new(cfg.reporter.url.clone()))
    }

    fn start_with(journal: Arc<Journal>, settings: Settings) -> Reporter {
        Reporter {
            worker: Worker::start("reporter", move |w| deliver_loop(&journal, &settings, w)),
        }
    }

    /// Wakes an idle reporter after a push. Never blocks on delivery. During a backoff it
    /// does not shorten the wait.
    pub fn notify(&self) {
        self.worker.notify();
    }

    /// Stops the thread and waits for it: at once when idle or backing off, else after the
    /// POST in progress ends (at most `REPORT_TIMEOUT_MS`). Undelivered reports stay in the
    /// outbox.
    pub fn stop(self) {
        self.worker.stop();
    }
}

fn agent(s: &Settings) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        // Loopback to device-api: never through an HTTP(S)_PROXY from the environment.
        .proxy(None)
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .timeout_connect(Some(s.connect_timeout))
        .timeout_global(Some(s.timeout))
        .user_agent(concat!("tope-updater/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::new_with_config(config)
}

/// One POST of `r`, judged.
fn post(agent: &ureq::Agent, url: &str, r: &Report) -> Verdict {
    let body = body_json(r);
    match agent.post(url).header("Content-Type", "application/json").send(&body[..]) {
        Err(e) => Verdict::RetryLater(format!("POST {url}: {e}")),
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            match resp.body_mut().with_config().limit(REPORT_RESPONSE_BYTES_MAX).read_to_string() {
                Ok(text) => judge_response(status, &text),
                Err(ureq::Error::BodyExceedsLimit(_)) => judge_response(status, ""),
                // The answer was cut off: whether it was a receipt is unknown; sending again
                // is safe (the receiver sees the same seq twice, consecutively).
                Err(e) => Verdict::RetryLater(format!("HTTP {status}, response unreadable: {e}")),
            }
        }
    }
}

fn deliver_loop(journal: &Journal, s: &Settings, shared: &Wakeup) {
    let agent = agent(s);
    let mut backoff = s.backoff_base;
    let mut failures: u32 = 0;
    'outer: loop {
        if shared.stopping() {
            return;
        }
        let batch = match journal.outbox_pending(s.batch) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "report outbox unreadable: the reporter stops; \
                    reports stay in the journal");
                return;
            }
        };
        if batch.is_empty() {
            if shared.sleep(s.idle_poll, true) {
                return;
            }
            continue;
        }
        for r in &batch {
            if shared.stopping() {
                return;
            }
            match post(&agent, &s.url, r) {
                Verdict::RetryLater(why) => {
                    failures += 1;
                    log_retry(r, failures, &why);
                    if shared.sleep(backoff, false) {
                        return;
                    }
                    backoff = next_backoff(backoff, s.backoff_max);
                    // The head may have changed meanwhile (the bound drops old progress).
                    continue 'outer;
                }
                verdict => {
                    if failures > 0 {
                        tracing::info!(seq = r.seq, failures, "report delivered after retries");
                    }
                    failures = 0;
                    backoff = s.backoff_base;
                    if !remove_answered(journal, r, &verdict) {
                        return;
                    }
                }
            }
        }
    }
}

fn log_retry(r: &Report, failures: u32, why: &str) {
    if failures == 1 {
        tracing::warn!(
            seq = r.seq,
            stage = r.stage,
            why,
            "report not delivered; retrying with backoff"
        );
    } else {
        tracing::debug!(seq = r.seq, failures, why, "report not delivered");
    }
}

/// Removes a report device-api answered (acknowledged, or rejected for good: logged and
/// dropped) from the outbox; `false` when the journal refuses, and the reporter must stop.
fn remove_answered(journal: &Journal, r: &Report, verdict: &Verdict) -> bool {
    if let Verdict::Rejected(why) = verdict {
        tracing::error!(
            seq = r.seq,
            stage = r.stage,
            tx = r.tx,
            why,
            "device-api rejected the report: dropped"
        );
    }
    // A crash here delivers the report again at the next start (same seq and body): delivery
    // is at least once, device-api deduplicates by seq.
    crate::failpoint::hit("outbox.delivered");
    if let Err(e) = journal.outbox_ack(r.seq) {
        tracing::error!(
            error = %e,
            seq = r.seq,
            "cannot remove a delivered report from the outbox: the reporter stops"
        );
        return false;
    }
    crate::failpoint::hit("outbox.acked");
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::Instant;

    // ---- a real receiver: std TcpListener, minimal HTTP/1.1, one request per connection ----

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Answer {
        /// HTTP 200 `{"code":200,"msg":"success","data":{"status":"received"}}`.
        Ack,
        /// HTTP 200 with this envelope code.
        Code(i64),
        /// This HTTP status.
        Status(u16),
        /// No answer until `release()` (then Ack) or until taken down (then closed).
        Hang,
    }

    /// Decides the answer from the body and how many times this seq was received before.
    type Policy = Box<dyn Fn(&Value, usize) -> Answer + Send>;

    #[derive(Debug, Clone)]
    struct Received {
        method: String,
        path: String,
        content_type: String,
        body: Value,
    }

    struct Inner {
        up: AtomicBool,
        released: AtomicBool,
        got: Mutex<Vec<Received>>,
        policy: Mutex<Policy>,
    }

    struct Receiver {
        port: u16,
        inner: Arc<Inner>,
        accept: Option<JoinHandle<()>>,
    }

    impl Receiver {
        fn start() -> Receiver {
            let inner = Arc::new(Inner {
                up: AtomicBool::new(false),
                released: AtomicBool::new(false),
                got: Mutex::new(Vec::new()),
                policy: Mutex::new(Box::new(|_, _| Answer::Ack)),
            });
            let mut r = Receiver { port: 0, inner, accept: None };
            r.bring_up();
            r
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}/api/v1.0/ota/report", self.port)
        }

        fn set_policy(&self, p: impl Fn(&Value, usize) -> Answer + Send + 'static) {
            *self.inner.policy.lock().unwrap() = Box::new(p);
        }

        fn release(&self) {
            self.inner.released.store(true, Ordering::SeqCst);
        }

        /// Listens (again) on the same port; what it received before is kept.
        fn bring_up(&mut self) {
            let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
            self.port = listener.local_addr().unwrap().port();
            listener.set_nonblocking(true).unwrap();
            self.inner.up.store(true, Ordering::SeqCst);
            let inner = self.inner.clone();
            self.accept = Some(std::thread::spawn(move || {
                while inner.up.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let inner = inner.clone();
                            std::thread::spawn(move || serve(stream, &inner));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
                // The listener is dropped here: connections are refused from now on.
            }));
        }

        fn take_down(&mut self) {
            self.inner.up.store(false, Ordering::SeqCst);
            if let Some(t) = self.accept.take() {
                t.join().unwrap();
            }
        }

        fn got(&self) -> Vec<Received> {
            self.inner.got.lock().unwrap().clone()
        }

        fn bodies(&self) -> Vec<Value> {
            self.got().into_iter().map(|r| r.body).collect()
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.take_down();
        }
    }

    fn serve(mut stream: TcpStream, inner: &Inner) {
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap().split(' ');
        let (method, path) =
            (request_line.next().unwrap().to_string(), request_line.next().unwrap().to_string());
        let mut headers = HashMap::new();
        for l in lines.filter(|l| !l.is_empty()) {
            let (k, v) = l.split_once(':').unwrap();
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        let len: usize = headers.get("content-length").map_or(0, |v| v.parse().unwrap());
        while buf.len() < head_end + len {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
        let before = {
            let mut got = inner.got.lock().unwrap();
            let before = got.iter().filter(|r| r.body["seq"] == body["seq"]).count();
            got.push(Received {
                method,
                path,
                content_type: headers.get("content-type").cloned().unwrap_or_default(),
                body: body.clone(),
            });
            before
        };
        let mut answer = (inner.policy.lock().unwrap())(&body, before);
        if answer == Answer::Hang {
            while !inner.released.load(Ordering::SeqCst) {
                if !inner.up.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            answer = Answer::Ack;
        }
        let (status, reply) = match answer {
            Answer::Ack => {
                (200, json!({"code": 200, "msg": "success", "data": {"status": "received"}}))
            }
            Answer::Code(c) => (200, json!({"code": c, "msg": format!("code {c}")})),
            Answer::Status(s) => (s, json!({"error": "no"})),
            Answer::Hang => unreachable!(),
        };
        let reply = reply.to_string();
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: \
            {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
    }

    // ---- helpers ----

    fn settings(url: String) -> Settings {
        Settings {
            url,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(80),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            idle_poll: Duration::from_millis(50),
            batch: 3,
        }
    }

    /// A progress report for tests (also used by the outbox's tests).
    pub(crate) fn report(stage: &str, progress: u8) -> Report {
        Report {
            stage: stage.into(),
            progress,
            message: format!("{stage} {progress}"),
            error: None,
            tx: None,
            boot_id: "boot-a".into(),
            seq: 0,
            final_report: false,
            version: None,
        }
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The seqs received, with consecutive repeats (a re-sent report) folded; a repeat must be
    /// byte-for-byte the same report.
    fn delivered_seqs(bodies: &[Value]) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            let seq = b["seq"].as_u64().unwrap();
            if out.last() == Some(&seq) {
                assert_eq!(b, &bodies[i - 1], "a duplicate differs from the original");
            } else {
                out.push(seq);
            }
        }
        out
    }

    fn open(dir: &std::path::Path) -> Arc<Journal> {
        Arc::new(Journal::open(dir).unwrap())
    }

    // ---- pure parts ----

    #[test]
    fn judge_response_follows_the_callback_contract() {
        let ack = r#"{"code":200,"msg":"success","data":{"status":"received"}}"#;
        assert_eq!(judge_response(200, ack), Verdict::Acknowledged);
        // A bare HTTP 200 is the receipt.
        assert_eq!(judge_response(200, ""), Verdict::Acknowledged);
        assert_eq!(judge_response(204, ""), Verdict::Acknowledged);
        assert_eq!(judge_response(200, "OK"), Verdict::Acknowledged);
        assert!(matches!(
            judge_response(200, r#"{"code":400,"msg":"VALIDATION_ERROR: stage"}"#),
            Verdict::Rejected(m) if m.contains("VALIDATION_ERROR")
        ));
        assert!(matches!(
            judge_response(200, r#"{"code":500,"msg":"INTERNAL_ERROR: db"}"#),
            Verdict::RetryLater(_)
        ));
        for s in [500, 502, 503, 504, 301, 307, 408, 429] {
            assert!(matches!(judge_response(s, ""), Verdict::RetryLater(_)), "HTTP {s}");
        }
        for s in [400, 401, 403, 404, 405, 413, 415, 422] {
            assert!(matches!(judge_response(s, ""), Verdict::Rejected(_)), "HTTP {s}");
        }
    }

    #[test]
    fn backoff_doubles_from_half_a_second_to_thirty_seconds() {
        let max = Duration::from_millis(REPORT_BACKOFF_MAX_MS);
        let mut d = Duration::from_millis(REPORT_BACKOFF_BASE_MS);
        let mut seen = vec![d.as_millis()];
        for _ in 0..8 {
            d = next_backoff(d, max);
            seen.push(d.as_millis());
        }
        assert_eq!(seen, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
    }

    #[test]
    fn the_body_is_the_legacy_payload_plus_tx_boot_and_seq() {
        let mut r = report("failed", 120);
        r.error = Some("MD5_MISMATCH: x".into());
        r.tx = Some(4);
        r.seq = 9;
        r.final_report = true;
        r.version = Some("1.2.3".into());
        assert_eq!(
            String::from_utf8(body_json(&r)).unwrap(),
            concat!(
                r#"{"stage":"failed","progress":100,"message":"failed 120","#,
                r#""error":"MD5_MISMATCH: x","version":"v1.2.3","tx_id":4,"boot_id":"boot-a","#,
                r#""seq":9,"final":true}"#
            )
        );
        let v: Value = serde_json::from_slice(&body_json(&report("idle", 0))).unwrap();
        assert_eq!(
            (&v["error"], &v["version"], &v["tx_id"], &v["final"]),
            (&Value::Null, &Value::Null, &Value::Null, &json!(false))
        );
    }

    // ---- against a real receiver ----

    #[test]
    fn reports_are_delivered_in_seq_order_and_removed_from_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::start();
        let j = open(dir.path());
        for p in 0..7 {
            j.outbox_push(report("downloading", p * 5)).unwrap();
        }
        let reporter = Reporter::start_with(j.clone(), settings(rx.url()));
        for p in 7..10 {
            j.outbox_push(report("downloading", p * 5)).unwrap();
            reporter.notify();
        }
        wait_until("10 reports arrived and the outbox is empty", || {
            rx.got().len() >= 10 && j.outbox_len().unwrap() == 0
        });
        reporter.stop();
        let got = rx.got();
        // A healthy receiver gets each report exactly once.
        assert_eq!(
            got.iter().map(|r| r.body["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(
            got.iter().map(|r| r.body["progress"].as_u64().unwrap()).collect::<Vec<_>>(),
            (0..10).map(|p| p * 5).collect::<Vec<_>>()
        );
        for r in &got {
            assert_eq!(
                (r.method.as_str(), r.path.as_str(), r.content_type.as_str()),
                ("POST", "/api/v1.0/ota/report", "application/json")
            );
            assert_eq!(r.body["stage"], "downloading");
            assert_eq!(r.body["boot_id"], "boot-a");
            assert_eq!(r.body["error"], Value::Null);
        }
    }

    #[test]
    fn receiver_down_then_back_gets_everything_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = Receiver::start();
        rx.take_down();
        let j = open(dir.path());
        let reporter = Reporter::start_with(j.clone(), settings(rx.url()));
        for p in 0..3 {
            j.outbox_push(report("downloading", p)).unwrap();
            reporter.notify();
        }
        // Connection refused for a while: several retries, nothing lost.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(j.outbox_len().unwrap(), 3);
        // Back, but answering 503 and then the contract's code 500 once before it works.
        rx.set_policy(|_, before| match before {
            0 => Answer::Status(503),
            1 => Answer::Code(500),
            _ => Answer::Ack,
        });
        rx.bring_up();
        for p in 3..5 {
            j.outbox_push(report("downloading", p)).unwrap();
            reporter.notify();
        }
        wait_until("the outbox is empty", || j.outbox_len().unwrap() == 0);
        reporter.stop();
        let bodies = rx.bodies();
        assert_eq!(delivered_seqs(&bodies), vec![1, 2, 3, 4, 5]);
        // Each one was refused twice and accepted once.
        assert_eq!(bodies.len(), 15);
    }

    #[test]
    fn after_a_restart_a_new_reporter_delivers_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = Receiver::start();
        {
            let j = open(dir.path());
            let reporter = Reporter::start_with(j.clone(), settings(rx.url()));
            for p in 0..2 {
                j.outbox_push(report("downloading", p)).unwrap();
                reporter.notify();
            }
            wait_until("the first two are delivered", || j.outbox_len().unwrap() == 0);
            rx.take_down();
            for p in 2..5 {
                j.outbox_push(report("downloading", p)).unwrap();
                reporter.notify();
            }
            std::thread::sleep(Duration::from_millis(100));
            // "Restart": the reporter stops, the journal closes.
            reporter.stop();
            assert_eq!(Arc::strong_count(&j), 1);
        }
        let j = open(dir.path());
        assert_eq!(
            j.outbox_pending(10).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        rx.bring_up();
        let reporter = Reporter::start_with(j.clone(), settings(rx.url()));
        j.outbox_push(report("verifying", 100)).unwrap();
        reporter.notify();
        wait_until("the rest is delivered", || j.outbox_len().unwrap() == 0);
        reporter.stop();
        assert_eq!(delivered_seqs(&rx.bodies()), vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn push_final_twice_for_a_transaction_delivers_one_final_report() {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::start();
        let j = open(dir.path());
        let reporter = Reporter::start_with(j.clone(), settings(rx.url()));
        j.outbox_push(report("installing", 50).with_tx(3)).unwrap();
        assert!(j.outbox_push_final(3, report("success", 100)).unwrap());
        // Recovery after a crash calls it again.
        assert!(!j.outbox_push_final(3, report("success", 100)).unwrap());
        assert!(j.outbox_push_final(4, report("failed", 100)).unwrap());
        reporter.notify();
        wait_until("the outbox is empty", || j.outbox_len().unwrap() == 0);
        reporter.stop();
        let bodies = rx.bodies();
        let finals: Vec<(u64, &str)> = bodies
            .iter()
            .filter(|b| b["final"] == json!(true))
            .map(|b| (b["tx_id"].as_u64().unwrap(), b["stage"].as_str().unwrap()))
            .collect();
        assert_eq!(finals, vec![(3, "success"), (4, "failed")]);
        assert_eq!(delivered_seqs(&bodies), vec![1, 2, 3]);
    }

    #[test]
    fn a_rejected_report_is_dropped_and_later_reports_still_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::start();
        rx.set_policy(|b, before| match (b["seq"].as_u64().unwrap(), before) {
            (2, _) => Answer::Status(400),
            (3, _) => Answer::Code(400),
            (4, _) => Answer::Status(404),
            (5, 0) => Answer::Status(429),
            (6, 0) => Answer::Status(408),
            _ => Answer::Ack,
        });
        let j = open(dir.path());
        for p in 0..7 {
            j.outbox_push(report("downloading", p)).unwrap();
        }
        let reporter = Reporter::start_with(j.clone(), settings(rx.url()));
        wait_until("the outbox is empty", || j.outbox_len().unwrap() == 0);
        reporter.stop();
        let seqs: Vec<u64> = rx.bodies().iter().map(|b| b["seq"].as_u64().unwrap()).collect();
        // Rejected ones are sent once and never again; 429 and 408 are retried.
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 5, 6, 6, 7]);
    }

    #[test]
    fn a_push_is_not_blocked_while_the_receiver_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::start();
        rx.set_policy(|b, _| if b["seq"] == json!(1) { Answer::Hang } else { Answer::Ack });
        let j = open(dir.path());
        let mut s = settings(rx.url());
        s.timeout = Duration::from_secs(30);
        let reporter = Reporter::start_with(j.clone(), s);
        j.outbox_push(report("downloading", 0)).unwrap();
        reporter.notify();
        wait_until("the reporter is inside the hanging POST", || rx.got().len() == 1);
        let started = Instant::now();
        for p in 1..4 {
            j.outbox_push(report("downloading", p)).unwrap();
            reporter.notify();
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "3 pushes took {took:?} while the POST hangs (timeout 30 s)"
        );
        assert_eq!(rx.got().len(), 1, "the hanging POST is still in progress");
        rx.release();
        wait_until("the outbox is empty", || j.outbox_len().unwrap() == 0);
        reporter.stop();
        assert_eq!(delivered_seqs(&rx.bodies()), vec![1, 2, 3, 4]);
    }

    #[test]
    fn stop_returns_promptly_while_backing_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = Receiver::start();
        rx.take_down();
        let j = open(dir.path());
        let mut s = settings(rx.url());
        s.backoff_base = Duration::from_secs(60);
        s.backoff_max = Duration::from_secs(60);
        let reporter = Reporter::start_with(j.clone(), s);
        j.outbox_push(report("downloading", 0)).unwrap();
        reporter.notify();
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        reporter.stop();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(j.outbox_len().unwrap(), 1);
    }
}
