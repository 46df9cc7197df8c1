//! Everything the process writes to stderr besides its `error: CODE: message` line: the logs
//! (SPEC §6) and the progress bar of `install` on a terminal.
//!
//! Logs are `tracing` events with ISO 8601 UTC timestamps (`2026-11-26T22:20:57.123456Z`) and
//! levels. Where they go:
//! - when stderr is the journal (`$JOURNAL_STREAM` names stderr's device and inode, as systemd
//!   sets it for a unit's stdout/stderr): one journal entry per line, with its level as the
//!   entry's priority (the `<N>` prefix of sd-daemon(3)) and without our timestamp (journald
//!   stamps each entry). The whole line, fields included, is the entry's MESSAGE, so
//!   `journalctl -u tope-updater` shows `phase failed phase=Swapped error=...`;
//! - otherwise stderr, as the caller or the unit set it up, coloured only on a terminal without
//!   `NO_COLOR`;
//! - and with `[log] file`, also that file, rotated at 10 MiB keeping 3 (`FILE.1` newest to
//!   `FILE.3` oldest, the legacy behaviour). A file that cannot be opened is a warning on
//!   stderr, never a failure.
//!
//! Not tracing-journald: its native-protocol entries carry only the event's message text as
//! MESSAGE (fields become `F_*` journal fields that only `journalctl -o verbose` shows), so the
//! default journal view would lose every detail; the stream protocol needs no dependency.

use crate::driver::Observer;
use crate::engine::Phase;
use crate::limits::{LOG_FILE_ROTATE_BYTES, LOG_FILES_KEPT};
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Subscriber;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::fmt::{self, MakeWriter, format, time::SystemTime};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Whether stderr is the journal: `$JOURNAL_STREAM` (`DEV:INODE`) names stderr's device and
/// inode. A `JOURNAL_STREAM` that does not match means stderr was redirected after systemd
/// connected it (a script's `2>file` in a unit): then stderr is what the caller wants.
pub fn stderr_is_journal(journal_stream: Option<&str>, stderr_dev_ino: Option<(u64, u64)>) -> bool {
    let stream = journal_stream.and_then(|s| {
        let (dev, ino) = s.trim().split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    stream.is_some() && stream == stderr_dev_ino
}

fn stderr_dev_ino() -> Option<(u64, u64)> {
    let fd = io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Installs the global subscriber (once per process; later calls do nothing).
pub fn init(level: LevelFilter, file: Option<&Path>) {
    let journal =
        stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref(), stderr_dev_ino());
    let ansi =
        io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let stderr = (!journal).then(|| text_layer(StderrWriter, ansi));
    let journal = journal.then(|| {
        fmt::layer().with_writer(JournalStream).without_time().with_ansi(false).with_target(false)
    });
    let file = file.and_then(|path| {
        match RotatingFile::open(path, LOG_FILE_ROTATE_BYTES, LOG_FILES_KEPT) {
            Ok(f) => Some(text_layer(Mutex::new(f), false).log_internal_errors(false)),
            Err(e) => {
                eprintln!("warning: log file {}: {e}; logging to stderr only", path.display());
                None
            }
        }
    });
    let _ =
        tracing_subscriber::registry().with(level).with(stderr).with(journal).with(file).try_init();
}

/// Stderr when it is a journal stream: each line of an event becomes one entry, prefixed with
/// the syslog priority of the event's level.
struct JournalStream;

impl<'a> MakeWriter<'a> for JournalStream {
    type Writer = JournalEntry;

    fn make_writer(&'a self) -> JournalEntry {
        JournalEntry { priority: 6, text: Vec::new() }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> JournalEntry {
        JournalEntry { priority: syslog_priority(*meta.level()), text: Vec::new() }
    }
}

fn syslog_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        tracing::Level::DEBUG | tracing::Level::TRACE => 7,
    }
}

/// One event, collected and written with one `write` when dropped.
struct JournalEntry {
    priority: u8,
    text: Vec<u8>,
}

impl Write for JournalEntry {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for JournalEntry {
    fn drop(&mut self) {
        let _ = io::stderr().lock().write_all(&with_priority(self.priority, &self.text));
    }
}

/// `<N>` before every line (a multi-line event stays one priority), each line ending in `\n`.
pub fn with_priority(priority: u8, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 8);
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        out.extend_from_slice(format!("<{priority}>").as_bytes());
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out
}

/// One line per event: `TIMESTAMP LEVEL message fields`.
pub fn text_layer<S, W>(
    writer: W,
    ansi: bool,
) -> fmt::Layer<S, format::DefaultFields, format::Format, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fmt::layer()
        .with_writer(writer)
        .with_timer(SystemTime)
        .with_ansi(ansi)
        .with_target(false)
        .with_level(true)
}

/// A file that is renamed to `PATH.1` (and `.1` to `.2`, ...; the oldest dropped) before a
/// write would take it past `max_bytes`. Each event is one write, so lines are never split.
/// Write errors are reported once on stderr and the line is dropped: logging never fails
/// the caller.
/// (Not the file-rotate crate: it brings chrono and flate2's default `miniz_oxide` backend beside
/// our zlib-rs, for what is these 60 lines.)
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    warned: bool,
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<RotatingFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = Self::open_file(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile { path: path.to_path_buf(), file, size, max_bytes, keep, warned: false })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new().create(true).append(true).mode(0o640).open(path)
    }

    fn numbered(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            for n in (1..self.keep).rev() {
                match std::fs::rename(self.numbered(n), self.numbered(n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, self.numbered(1))?;
            self.file = Self::open_file(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }

    fn warn_once(&mut self, what: &str, e: &io::Error) {
        if !std::mem::replace(&mut self.warned, true) {
            eprintln!("warning: log file {}: {what}: {e}", self.path.display());
        }
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0
            && self.size + buf.len() as u64 > self.max_bytes
            && let Err(e) = self.rotate()
        {
            // Keep writing to the file we have: a full log beats no log.
            self.warn_once("rotate", &e);
        }
        match self.file.write_all(buf) {
            Ok(()) => self.size += buf.len() as u64,
            Err(e) => self.warn_once("write", &e),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Set while a progress bar line is on stderr: the next log line erases it first (the bar is
/// redrawn at its next update).
static BAR_SHOWN: AtomicBool = AtomicBool::new(false);
const CLEAR_LINE: &[u8] = b"\r\x1b[2K";

struct StderrWriter;

impl<'a> MakeWriter<'a> for StderrWriter {
    type Writer = io::StderrLock<'static>;

    fn make_writer(&'a self) -> Self::Writer {
        let mut lock = io::stderr().lock();
        if BAR_SHOWN.swap(false, Ordering::Relaxed) {
            let _ = lock.write_all(CLEAR_LINE);
        }
        lock
    }
}

/// Whether `install` shows a progress bar: stderr is a terminal that can take one.
pub fn progress_wanted(json: bool) -> bool {
    !json && io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// The progress bar of `install` on a terminal: the phase by name, staging by bytes.
pub struct InstallProgress {
    started: Instant,
    state: Mutex<BarState>,
}

struct BarState {
    phase: &'static str,
    done: u64,
    total: u64,
    module: String,
    index: usize,
    modules: usize,
    drawn: Option<Instant>,
}

/// Redraws at most this often while staging.
const BAR_REDRAW: Duration = Duration::from_millis(100);
const BAR_WIDTH: usize = 16;
const BAR_MODULE_CHARS: usize = 12;
/// A line longer than the terminal wraps, and `\r` can no longer erase it: lines are cut to
/// `$COLUMNS - 1` (79 without it).
const BAR_COLUMNS_DEFAULT: usize = 80;

impl InstallProgress {
    /// Shows the bar at once (validating the package comes before the first phase).
    pub fn start() -> Arc<InstallProgress> {
        let p = InstallProgress {
            started: Instant::now(),
            state: Mutex::new(BarState {
                phase: "Validating",
                done: 0,
                total: 0,
                module: String::new(),
                index: 0,
                modules: 0,
                drawn: None,
            }),
        };
        p.redraw(true);
        Arc::new(p)
    }

    /// Erases the bar, so the result line takes its place.
    pub fn finish(&self) {
        let _state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut err = io::stderr().lock();
        if BAR_SHOWN.swap(false, Ordering::Relaxed) {
            let _ = err.write_all(CLEAR_LINE);
            let _ = err.flush();
        }
    }

    fn redraw(&self, force: bool) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if !force && s.drawn.is_some_and(|t| now.duration_since(t) < BAR_REDRAW) && s.done < s.total
        {
            return;
        }
        s.drawn = Some(now);
        let columns = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse::<usize>().ok())
            .filter(|c| *c > 1)
            .unwrap_or(BAR_COLUMNS_DEFAULT);
        let line: String = render_bar(
            s.phase,
            s.done,
            s.total,
            &s.module,
            s.index,
            s.modules,
            now.duration_since(self.started),
        )
        .chars()
        .take(columns - 1)
        .collect();
        let mut err = io::stderr().lock();
        let _ = err.write_all(CLEAR_LINE);
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
        BAR_SHOWN.store(true, Ordering::Relaxed);
    }
}

impl Observer for InstallProgress {
    fn phase(&self, _tx: u64, phase: Phase) {
        {
            let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            s.phase = phase.name();
            // Which module was staged last means nothing after staging.
            s.modules = 0;
        }
        self.redraw(true);
    }

    fn staged(&self, module: &str, index: usize, modules: usize, done: u64, total: u64) {
        {
            let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Staging runs on several threads: keep the furthest count.
            s.done = s.done.max(done);
            s.total = total;
            if s.module != module {
                s.module = module.to_string();
            }
            (s.index, s.modules) = (index, modules);
        }
        self.redraw(false);
    }
}

/// One line of the bar: `Staged          [=========>      ]  62%  12.0/19.3 MiB  app (1/3)  4s`.
pub fn render_bar(
    phase: &str,
    done: u64,
    total: u64,
    module: &str,
    index: usize,
    modules: usize,
    elapsed: Duration,
) -> String {
    let fraction = if total == 0 {
        if done > 0 { 1.0 } else { 0.0 }
    } else {
        (done.min(total) as f64) / (total as f64)
    };
    #[allow(clippy::cast_sign_loss, reason = "fraction is in 0..=1")]
    let filled = (fraction * BAR_WIDTH as f64).round() as usize;
    let mut bar = "=".repeat(filled);
    if filled < BAR_WIDTH {
        bar.push(if filled > 0 { '>' } else { ' ' });
        bar.push_str(&" ".repeat(BAR_WIDTH - filled - 1));
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    #[allow(clippy::cast_sign_loss, reason = "fraction is in 0..=1")]
    let percent = (fraction * 100.0).round() as u32;
    let mut line = format!("{phase:<15} [{bar}] {percent:>3}%");
    if total > 0 {
        line += &format!("  {:.1}/{:.1} MiB", mib(done), mib(total));
    }
    if modules > 0 {
        let name: String = module.chars().take(BAR_MODULE_CHARS).collect();
        line += &format!("  {name} ({index}/{modules})");
    }
    line += &format!("  {}s", elapsed.as_secs());
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn the_log_file_rotates_before_passing_the_size_and_keeps_three() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/updater.log");
        let mut f = RotatingFile::open(&path, 100, 3).unwrap();
        // 30-byte lines: three fit in 100 bytes, the fourth starts a new file.
        for i in 0..20 {
            f.write_all(format!("line {i:02} ........................\n").as_bytes()).unwrap();
        }
        let rotated = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
        for p in [path.clone(), rotated(1), rotated(2), rotated(3)] {
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len <= 100 && len > 0, "{} has {len} bytes", p.display());
        }
        assert!(!rotated(4).exists(), "only three rotated files are kept");
        // Lines 00..20, three per file: .3 holds 09-11, .2 12-14, .1 15-17, the live file 18-19.
        assert!(read(&path).starts_with("line 18"), "{}", read(&path));
        assert!(read(&rotated(1)).starts_with("line 15"));
        assert!(read(&rotated(3)).starts_with("line 09"));
        assert!(
            read(&rotated(3)).ends_with("line 11 ........................\n"),
            "lines are never split"
        );
    }

    #[test]
    fn reopening_continues_the_file_and_counts_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.log");
        std::fs::write(&path, "x".repeat(90)).unwrap();
        let mut f = RotatingFile::open(&path, 100, 3).unwrap();
        f.write_all(b"0123456789abcdef\n").unwrap();
        assert_eq!(
            read(&path),
            "0123456789abcdef\n",
            "90 + 17 bytes would pass 100: rotated first"
        );
        assert_eq!(read(&dir.path().join("u.log.1")).len(), 90);
    }

    #[test]
    fn an_unopenable_log_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert!(RotatingFile::open(&dir.path().join("file/under/a/file.log"), 100, 3).is_err());
    }

    /// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z` strictly; returns Unix seconds.
    fn parse_iso8601_utc(s: &str) -> Option<i64> {
        let b = s.as_bytes();
        let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || b[10] != b'T'
            || b[13] != b':'
            || b[16] != b':'
            || !s.ends_with('Z')
        {
            return None;
        }
        let frac = &s[19..s.len() - 1];
        let digits = frac
            .strip_prefix('.')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()));
        if !frac.is_empty() && !digits {
            return None;
        }
        let (y, mo, d, h, mi, se) =
            (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
            return None;
        }
        Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se)
    }

    #[test]
    fn log_lines_start_with_an_iso8601_utc_timestamp_and_a_level() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.log");
        let file = RotatingFile::open(&path, LOG_FILE_ROTATE_BYTES, LOG_FILES_KEPT).unwrap();
        let subscriber = tracing_subscriber::registry()
            .with(LevelFilter::INFO)
            .with(text_layer(Mutex::new(file), false));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(tx = 7, "something to see");
            tracing::debug!("filtered out");
        });
        let text = read(&path);
        let line = text.lines().next().unwrap_or_else(|| panic!("no line in {text:?}"));
        let mut words = line.split_whitespace();
        let stamp = words.next().unwrap();
        let secs = parse_iso8601_utc(stamp)
            .unwrap_or_else(|| panic!("not ISO 8601 UTC: {stamp:?} in {line:?}"));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let now = i64::try_from(now.as_secs()).unwrap();
        assert!((now - secs).abs() < 120, "the timestamp is now, in UTC: {stamp} vs {now}");
        assert_eq!(words.next(), Some("WARN"), "{line}");
        assert!(line.contains("something to see") && line.contains("tx=7"), "{line}");
        assert_eq!(text.lines().count(), 1, "the level filter applies: {text}");
        assert!(!text.contains('\x1b'), "no colour in the file");
    }

    #[test]
    fn the_iso8601_checker_rejects_what_is_not() {
        assert_eq!(parse_iso8601_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_iso8601_utc("2000-03-01T00:00:01.5Z"), Some(951_868_801));
        for bad in [
            "2026-11-26 22:20:57Z",
            "2026-11-26T22:20:57",
            "2026-13-26T22:20:57Z",
            "2026-11-26T22:20:57.Z",
        ] {
            assert_eq!(parse_iso8601_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn stderr_is_the_journal_only_when_journal_stream_names_it() {
        let me = Some((64769, 123_456));
        assert!(stderr_is_journal(Some("64769:123456"), me));
        assert!(stderr_is_journal(Some("64769:123456\n"), me));
        assert!(!stderr_is_journal(Some("64769:999"), me), "redirected after systemd connected it");
        assert!(!stderr_is_journal(None, me));
        assert!(!stderr_is_journal(Some("garbage"), me));
        assert!(!stderr_is_journal(None, None));
    }

    #[test]
    fn journal_lines_carry_the_priority_of_their_level() {
        assert_eq!(
            with_priority(syslog_priority(tracing::Level::WARN), b" WARN phase failed error=x\n"),
            b"<4> WARN phase failed error=x\n"
        );
        assert_eq!(with_priority(3, b"a\nb"), b"<3>a\n<3>b\n", "every line of a multi-line event");
        assert_eq!(syslog_priority(tracing::Level::ERROR), 3);
        assert_eq!(syslog_priority(tracing::Level::INFO), 6);
        assert_eq!(syslog_priority(tracing::Level::TRACE), 7);
    }

    #[test]
    fn the_bar_shows_phase_fraction_and_module() {
        let l = render_bar(
            "Staged",
            512 * 1024,
            1024 * 1024,
            "a-very-long-module-name-indeed",
            2,
            3,
            Duration::from_secs(4),
        );
        assert!(l.starts_with("Staged          ["), "{l}");
        assert!(l.contains("  50%  0.5/1.0 MiB  a-very-long- (2/3)  4s"), "{l}");
        assert!(l.chars().count() < 80, "{} chars: {l}", l.chars().count());
        let full = render_bar("Committed", 10, 10, "", 0, 0, Duration::ZERO);
        assert!(full.contains(&format!("[{}] 100%", "=".repeat(BAR_WIDTH))), "{full}");
        let empty = render_bar("Validating", 0, 0, "", 0, 0, Duration::ZERO);
        assert!(empty.contains(&format!("[{}]   0%", " ".repeat(BAR_WIDTH))), "{empty}");
    }
}
