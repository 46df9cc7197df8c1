//! The HTTP API (SPEC §5): the legacy contract (`contracts/updater-api.yaml`) exactly — HTTP
//! 200 always, `{code, msg, data}` — plus `rollback`, `confirm` and `status`. `openapi.yaml`
//! describes every endpoint. Handlers never touch the disk on the runtime thread: journal work
//! goes to `spawn_blocking` or a job thread.

use super::Daemon;
use super::jobs;
use super::progress::Stage;
use crate::download::DownloadRequest;
use crate::driver::RollbackTo;
use crate::error::{Error, ErrorCode, Result};
use crate::limits::{API_BODY_BYTES_MAX, API_BODY_READ_TIMEOUT_MS};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

type Shared = State<Arc<Daemon>>;

/// The application code the legacy contract uses for an error.
pub fn http_code(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::ValidationError | ErrorCode::RequestRefused => 400,
        ErrorCode::NothingToRollBack => 404,
        ErrorCode::OperationInProgress
        | ErrorCode::DownloadIncomplete
        | ErrorCode::Md5NotVerified => 409,
        ErrorCode::PackageExpired => 410,
        _ => 500,
    }
}

fn ok(data: Value) -> Response {
    Json(json!({ "code": 200, "msg": "success", "data": data })).into_response()
}

fn err(e: &Error) -> Response {
    Json(json!({ "code": http_code(e.code), "msg": format!("{}: {}", e.code, e.message) }))
        .into_response()
}

/// An error answer of the legacy operations (`/download`, `/update`): a conflict (409) or an
/// expired package (410) also names the current stage and progress at the root, as the
/// legacy contract's `ErrorResponse` and the Python service do ("for operation state errors").
/// The new operations answer `CodedErrorResponse`, which has no such fields.
fn err_in(d: &Daemon, e: &Error) -> Response {
    let code = http_code(e.code);
    if code != 409 && code != 410 {
        return err(e);
    }
    let s = d.progress.get();
    let msg = format!("{}: {}", e.code, e.message);
    Json(json!({ "code": code, "msg": msg, "stage": s.stage, "progress": s.progress }))
        .into_response()
}

fn reply_in(d: &Daemon, r: Result<Value>) -> Response {
    match r {
        Ok(v) => ok(v),
        Err(e) => err_in(d, &e),
    }
}

fn reply(r: Result<Value>) -> Response {
    match r {
        Ok(v) => ok(v),
        Err(e) => err(&e),
    }
}

/// Reads the body with a size and a time limit (a client trickling its body must not hold a
/// connection); errors are `VALIDATION_ERROR` in the envelope, never axum's own 4xx/413
/// answers (the contract always answers HTTP 200).
async fn read_body(body: axum::body::Body) -> Result<Bytes> {
    let (max, ms) = (API_BODY_BYTES_MAX, API_BODY_READ_TIMEOUT_MS);
    match tokio::time::timeout(
        std::time::Duration::from_millis(ms),
        axum::body::to_bytes(body, max),
    )
    .await
    {
        Ok(read) => read.map_err(|e| {
            Error::new(
                ErrorCode::ValidationError,
                format!("request body (at most {max} bytes): {e}"),
            )
        }),
        Err(_) => Err(Error::new(
            ErrorCode::ValidationError,
            format!("request body not received within {ms} ms"),
        )),
    }
}

/// A JSON body, or `VALIDATION_ERROR` in the envelope (never axum's own 4xx rejection).
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    let bad =
        |e: serde_json::Error| Error::new(ErrorCode::ValidationError, format!("request body: {e}"));
    // Every body of the contract is an object. serde would also read a struct from a JSON
    // array (`[null]` as a rollback with no `to`): such a request is refused, not acted on.
    match serde_json::from_slice(body).map_err(bad)? {
        v @ serde_json::Value::Object(_) => serde_json::from_value(v).map_err(bad),
        _ => Err(Error::new(ErrorCode::ValidationError, "request body: expected a JSON object")),
    }
}

/// Runs journal work off the runtime thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::internal(format!("worker: {e}")))?
}

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/api/v1.0/download", post(download))
        .route("/api/v1.0/update", post(update))
        .route("/api/v1.0/progress", get(progress))
        .route("/api/v1.0/rollback", post(rollback))
        .route("/api/v1.0/confirm", post(confirm))
        .route("/api/v1.0/status", get(status))
        .route("/api/v1.0/history", get(history))
        .route("/api/v1.0/return-to-system", post(return_to_system))
        .route("/", get(health))
        .with_state(d)
}

/// What the Python service answered at `/` (its clients and test plans use it as a health
/// check): `status` and `service`, and a non-empty `features`.
async fn health() -> Response {
    Json(json!({
        "status": "ok",
        "service": "tope-updater",
        "version": env!("CARGO_PKG_VERSION"),
        "features": ["Transactional Installs", "Rollback", "Progress Reporting", "systemd \
        Integration"],
    }))
    .into_response()
}

/// The newest legacy GUI's goodbye: it has shown the result, so `/progress` returns to idle now
/// (the Python service's answer, whatever the body).
async fn return_to_system(State(d): Shared) -> Response {
    d.progress.acknowledge();
    Json(json!({ "code": 200, "msg": "success", "data": null })).into_response()
}

async fn progress(State(d): Shared) -> Response {
    let s = d.progress.get();
    if s.stage == Stage::Failed {
        // The contract's failed shape: the error in `msg`, stage and progress at the root; and
        // `data` as the GUIs read it (the legacy GUI reads only `data.stage`, and would never
        // see `failed` without it). `data` carries the error text as its `message` but no
        // `error` key: with it, the answer would match both branches of the contract's
        // `oneOf` (ProgressResponse and ErrorResponse) and so neither.
        let msg = s.error.clone().unwrap_or_else(|| s.message.clone());
        let data = json!({ "stage": s.stage, "progress": s.progress, "message": msg });
        let body = json!({
            "code": 500, "msg": msg, "data": data, "stage": "failed", "progress": s.progress
        });
        return Json(body).into_response();
    }
    ok(json!({ "stage": s.stage, "progress": s.progress, "message": s.message, "error": s.error }))
}

async fn download(State(d): Shared, body: axum::body::Body) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return err(&e),
    };
    let req: DownloadRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(&e),
    };
    if let Err(e) = crate::download::validate(&req, &d.cfg) {
        return err(&e);
    }
    // The download that is running, asked for again (device-api repeating its request after
    // our restart resumed it): that download is accepted, not a conflict.
    if d.running_download().as_ref() == Some(&req) {
        return ok(json!({ "status": "downloading" }));
    }
    // A verified package waits for its install: another download is refused, as the legacy
    // service did, instead of deleting the waiting package. The same request is fine (it
    // answers from the verified file at once).
    if d.progress.get().stage == Stage::ToInstall {
        let (d2, req2) = (d.clone(), req.clone());
        let waiting = blocking(move || {
            let rec = d2.held.journal.download()?;
            let now = crate::clock::now_unix_ms();
            Ok(rec.filter(|r| {
                r.request != req2.spec()
                    && crate::download::check_installable(
                        Some(r),
                        &r.request.version,
                        d2.cfg.download.trust_window_h,
                        now,
                    )
                    .is_ok()
            }))
        })
        .await;
        match waiting {
            Ok(Some(rec)) => {
                let e = Error::new(
                    ErrorCode::OperationInProgress,
                    format!(
                        "Cannot start download, package {} (version {}) is verified and waits for \
                        POST /update",
                        rec.request.package_name, rec.request.version
                    ),
                );
                return err_in(&d, &e);
            }
            Ok(None) => {}
            Err(e) => return err(&e),
        }
    }
    let accepted = match d.start_download(req.clone()) {
        Err(_) if d.running_download().as_ref() == Some(&req) => Ok(()),
        r => r,
    };
    reply_in(&d, accepted.map(|()| json!({ "status": "downloading" })))
}

#[derive(Deserialize)]
struct UpdateRequest {
    version: String,
}

async fn update(State(d): Shared, body: axum::body::Body) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return err(&e),
    };
    let req: UpdateRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(&e),
    };
    if crate::version::Version::parse(&req.version).is_err() {
        return err(&Error::new(
            ErrorCode::ValidationError,
            "version must match semantic versioning pattern",
        ));
    }
    if d.busy() {
        return err_in(
            &d,
            &Error::new(
                ErrorCode::OperationInProgress,
                "Cannot install, another operation is in progress",
            ),
        );
    }
    let d2 = d.clone();
    let version = req.version.clone();
    let package = blocking(move || {
        let rec = d2.held.journal.download()?;
        let checked = crate::download::check_installable(
            rec.as_ref(),
            &version,
            d2.cfg.download.trust_window_h,
            crate::clock::now_unix_ms(),
        );
        // An expired package can never be installed: it goes now (device-api downloads again).
        if let (Err(e), Some(rec)) = (&checked, &rec)
            && e.code == ErrorCode::PackageExpired
            && let Err(e) = crate::download::discard(&d2.held.journal, rec)
        {
            tracing::warn!(error = %e, "could not remove the expired package");
        }
        checked
    })
    .await;
    let package = match package {
        Ok(p) => p,
        Err(e) => return err_in(&d, &e),
    };
    reply_in(
        &d,
        d.start_job("install", jobs::install_started(), move |d| {
            jobs::install_job(&d, package, req.version);
        })
        .map(|()| json!({ "status": "installing" })),
    )
}

#[derive(Deserialize, Default)]
struct RollbackRequest {
    to: Option<String>,
}

async fn rollback(State(d): Shared, body: axum::body::Body) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return err(&e),
    };
    let req: RollbackRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(&e),
    };
    let to = match req.to.as_deref() {
        None | Some("previous") => RollbackTo::Previous,
        Some("factory") => RollbackTo::Factory,
        Some(v) if crate::version::Version::parse(v).is_ok() => RollbackTo::Version(v.to_string()),
        Some(v) => {
            return err(&Error::new(
                ErrorCode::ValidationError,
                format!("to {v:?}: expected previous, factory or MAJOR.MINOR.PATCH"),
            ));
        }
    };
    if d.busy() {
        return err(&Error::new(
            ErrorCode::OperationInProgress,
            "Cannot roll back, another operation is in progress",
        ));
    }
    // Refuse up front what would fail at once (nothing to roll back to), so the caller gets
    // 404 instead of a failed stage.
    let d2 = d.clone();
    let to2 = to.clone();
    if let Err(e) =
        blocking(move || crate::driver::check_rollback_target(&d2.held.journal, &to2)).await
    {
        return err(&e);
    }
    reply(
        d.start_job("rollback", jobs::rollback_started(), move |d| jobs::rollback_job(&d, to))
            .map(|()| json!({ "status": "installing" })),
    )
}

async fn confirm(State(d): Shared) -> Response {
    if d.busy() {
        return err(&Error::new(
            ErrorCode::OperationInProgress,
            "Cannot confirm while an operation is in progress",
        ));
    }
    let d2 = d.clone();
    reply(
        blocking(move || {
            let mut up = d2.updater()?;
            let r = up.confirm()?;
            // A fleet server learns the trial's end at once, not a poll later.
            d2.notify_ddi_poller();
            serde_json::to_value(r).map_err(|e| Error::internal(e.to_string()))
        })
        .await,
    )
}

async fn status(State(d): Shared) -> Response {
    let d2 = d.clone();
    reply(
        blocking(move || {
            let s = crate::driver::status(&d2.held.journal, d2.cfg.max_trial_boots)?;
            serde_json::to_value(s).map_err(|e| Error::internal(e.to_string()))
        })
        .await,
    )
}

/// Past transactions, newest first (what `tope-updater history --json` prints); `?limit=N`.
async fn history(State(d): Shared, q: axum::extract::RawQuery) -> Response {
    let limit =
        match q.0.as_deref().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("limit="))) {
            None => 20,
            Some(v) => match v.parse::<usize>() {
                Ok(n) => n.min(crate::limits::HISTORY_TX_MAX),
                Err(_) => {
                    return err(&Error::new(
                        ErrorCode::ValidationError,
                        format!("limit {v:?}: expected a non-negative integer"),
                    ));
                }
            },
        };
    let d2 = d.clone();
    reply(
        blocking(move || {
            let h = d2.held.journal.history(limit)?;
            serde_json::to_value(h).map_err(|e| Error::internal(e.to_string()))
        })
        .await,
    )
}

/// Serves until SIGTERM or SIGINT, then returns (the caller lets the job finish its step).
pub async fn run(d: Arc<Daemon>) -> Result<()> {
    let listen = d.cfg.api.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
        Error::new(ErrorCode::InternalError, format!("cannot listen on {listen}: {e}"))
    })?;
    let addr = listener.local_addr().map_err(|e| Error::internal(e.to_string()))?;
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    }
    tracing::info!(%addr, "serving");
    // systemd Type=notify: ready once recovery is done and requests are accepted (a no-op
    // outside systemd: NOTIFY_SOCKET is unset).
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify systemd of readiness");
    }
    // Where the CLI finds the API when `api.listen` has port 0 (tests); removed at exit. It
    // means nothing after a crash or power cut (the next start rewrites it), so it is written
    // without fsync: no durability to pay for.
    let addr_file = super::addr_file(&d.cfg.state_dir);
    let d_addr = addr.to_string();
    let written = blocking(move || {
        std::fs::write(&addr_file, d_addr)
            .map_err(|e| Error::io(ErrorCode::InternalError, "write", &addr_file, &e))
    })
    .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "could not record the API address for the CLI");
    }
    warn_if_open_to_every_local_user(&d.cfg, addr);
    let cancel = d.cancel.clone();
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::internal(format!("cannot watch SIGTERM: {e}")))?;
    let shutdown = async move {
        let mut term = term;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested: finishing the current step");
        cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let policy = super::guard::Policy::new(&d.cfg.api);
    super::conns::serve(listener, router(d), policy, shutdown).await;
    Ok(())
}

/// SECURITY.md: with unsigned packages allowed, whoever can call the API can have commands
/// run as root (a package's `post_cmds`). Said once at start, with the keys that close it.
fn warn_if_open_to_every_local_user(cfg: &crate::config::Config, addr: std::net::SocketAddr) {
    if cfg.require_signature {
        return;
    }
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the API listens beyond loopback and accepts unsigned packages: \
            anyone who reaches {addr} can run commands as root through a package's post_cmds; set \
            require_signature = true with trusted_keys (SECURITY.md)");
    } else if cfg.api.allowed_uids.is_empty() {
        tracing::warn!(
            "the API accepts unsigned packages from every local user: any local process can run \
            commands as root through a package's post_cmds; set api.allowed_uids and \
            require_signature = true with trusted_keys (SECURITY.md)"
        );
    }
}
