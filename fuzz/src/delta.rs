//! Helpers of the delta targets (`delta_apply`, `delta_structured`) and of their seed
//! generator: the fixed bases, the raw input layout, a mirror of the patch format (the
//! engine's window header is private; the generator checks the mirror against `make_patch`'s
//! output, and an accepted patch must read whole with it), heap accounting, and
//! `check_apply`, which applies a patch and panics on a violated property.

use serde::{Deserialize, Serialize};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use tope_updater::delta::{self, PatchError, Span};
use tope_updater::engine::Hash;
use tope_updater::limits::{
    DELTA_BSDIFF_STREAM_BYTES_MAX, DELTA_HEADER_BYTES_MAX, DELTA_PAYLOAD_BYTES_MAX, DELTA_REF_BYTES_MAX, DELTA_WINDOW_BYTES,
};

// ---- heap accounting ----

/// A global allocator that counts the live bytes of the Rust heap and their peak. Each delta
/// target installs it (`#[global_allocator]`); libzstd's own contexts are C allocations and
/// are not counted (they are small and fixed: one-shot decoding allocates no window).
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Runs `f` and returns its result and the peak of live heap bytes above what was live when
/// it started. Panics if the binary did not install `CountingAlloc` (a check that measures
/// nothing would pass everything).
pub fn peak_heap_of<R>(f: impl FnOnce() -> R) -> (R, u64) {
    static ACTIVE: OnceLock<bool> = OnceLock::new();
    let active = *ACTIVE.get_or_init(|| {
        let before = LIVE.load(Relaxed);
        let v = std::hint::black_box(Vec::<u8>::with_capacity(4096));
        let after = LIVE.load(Relaxed);
        drop(v);
        after >= before + 4096
    });
    assert!(active, "the fuzz target must install tope_updater_fuzz::delta::CountingAlloc as its global allocator");
    let start = LIVE.load(Relaxed);
    PEAK.store(start, Relaxed);
    let r = f();
    (r, (PEAK.load(Relaxed) - start) as u64)
}

// ---- a mirror of the patch format (src/delta.rs) ----
//
// A patch is, per window of `delta::spans(target_size, base_size)`, a bincode `WindowHeader`
// and its payload; nothing else (the manifest names the base and the target size).

const CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DELTA_HEADER_BYTES_MAX>,
> = bincode::config::standard().with_limit::<DELTA_HEADER_BYTES_MAX>();

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    Zstd,
    BsdiffZstd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowHeader {
    pub method: Method,
    pub payload_len: u64,
}

pub fn encode<T: Serialize>(v: &T, out: &mut Vec<u8>) {
    bincode::serde::encode_into_std_write(v, out, CONFIG).expect("header encodes");
}

fn decode_at<T: serde::de::DeserializeOwned>(bytes: &[u8], pos: &mut usize) -> Option<T> {
    let (v, n) = bincode::serde::decode_from_slice(bytes.get(*pos..)?, CONFIG).ok()?;
    *pos += n;
    Some(v)
}

/// One window as the mirror reads it: its header and where its payload starts.
#[derive(Debug, Clone)]
pub struct ParsedWindow {
    pub header: WindowHeader,
    pub payload_at: usize,
}

#[derive(Debug, Default)]
pub struct Parsed {
    /// The windows whose header decoded, in order (at most `windows`).
    pub windows: Vec<ParsedWindow>,
    /// All `windows` headers decoded and their payloads are present; `end` is where the last
    /// one ends.
    pub complete: bool,
    pub end: usize,
}

/// Reads `patch` as `windows` windows with the mirror types, as far as they decode (no limit
/// checks, no decompression).
pub fn parse(patch: &[u8], windows: usize) -> Parsed {
    let mut p = Parsed::default();
    let mut pos = 0;
    for _ in 0..windows {
        let Some(w) = decode_at::<WindowHeader>(patch, &mut pos) else { return p };
        let payload_at = pos;
        let end = usize::try_from(w.payload_len).ok().and_then(|l| pos.checked_add(l)).filter(|&e| e <= patch.len());
        p.windows.push(ParsedWindow { header: w, payload_at });
        let Some(end) = end else { return p };
        pos = end;
    }
    p.complete = true;
    p.end = pos;
    p
}

/// The method of each window of a well-formed patch (the generator's report).
pub fn methods(patch: &[u8], target_size: u64, base_size: u64) -> Vec<Method> {
    parse(patch, delta::spans(target_size, base_size).len()).windows.iter().map(|w| w.header.method).collect()
}

// ---- the memory bound ----

/// Heap the engine may hold besides its window buffers: the span list (two words per span of
/// headroom for its growth), headers, error messages, the mutex guard.
fn slack(spans: usize) -> u64 {
    128 * 1024 + 2 * spans as u64 * std::mem::size_of::<Span>() as u64
}

/// What limits.rs allows applying one patch to hold, whatever the patch: one reference, one
/// payload, one bsdiff stream and one window of output.
pub const LIMITS_BUDGET: u64 = DELTA_REF_BYTES_MAX + DELTA_PAYLOAD_BYTES_MAX + DELTA_BSDIFF_STREAM_BYTES_MAX + DELTA_WINDOW_BYTES;

/// The heap applying `patch` may peak at, window by window, as delta.rs documents it: the
/// window's reference, its payload, for bsdiff the stream its frame declares, and the
/// window's output (exactly its length: the output buffer "is never grown"). A window the
/// engine must refuse on its header allocates nothing; the count stops where `apply` stops
/// reading.
pub fn window_budget(patch: &[u8], base_size: u64, declared: u64) -> u64 {
    let spans = delta::spans(declared, base_size);
    let parsed = parse(patch, spans.len());
    let mut worst = 0u64;
    for (span, w) in spans.iter().zip(&parsed.windows) {
        let h = &w.header;
        if h.payload_len > DELTA_PAYLOAD_BYTES_MAX {
            break;
        }
        let mut need = span.ref_len + h.payload_len;
        let payload = patch.get(w.payload_at..w.payload_at + h.payload_len as usize);
        if let Some(payload) = payload {
            if h.method == Method::BsdiffZstd
                && let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(payload)
                && n <= DELTA_BSDIFF_STREAM_BYTES_MAX
            {
                need += n;
            }
            need += span.out_len;
        }
        worst = worst.max(need);
        if payload.is_none() {
            break;
        }
    }
    worst + slack(spans.len())
}

// ---- bases ----

/// Deterministic pseudo-random bytes (xorshift), incompressible like code.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Noise with structure, like a binary: instructions (4-byte words from a small set with
/// random low bytes), a string table, and a table of 8-byte addresses.
pub fn code_like(len: usize, seed: u64) -> Vec<u8> {
    let r = noise(len, seed);
    let mut out = Vec::with_capacity(len);
    let mut i = 0;
    while out.len() < len {
        match (i / 512) % 3 {
            0 => out.extend_from_slice(&[0x48, 0x8b, r[i % len], r[(i + 1) % len]]),
            1 => out.extend_from_slice(format!("str{:04x}\0", r[i % len] as u32 * 7 + i as u32).as_bytes()),
            _ => out.extend_from_slice(&(0x40_0000u64 + (i as u64) * 16 + (r[i % len] as u64 & 0xf)).to_le_bytes()),
        }
        i += 1;
    }
    out.truncate(len);
    out
}

/// A shell script and its configuration, about 3 KiB.
pub fn text() -> Vec<u8> {
    let mut s = String::from("#!/bin/sh\n# device-api launcher, generated\nset -eu\n");
    for i in 0..48 {
        s.push_str(&format!("export TOPE_OPTION_{i:02}=\"value-{}\"\n", i * 37 % 101));
    }
    s.push_str("exec /opt/tope/device-api/device-api --daemon --config /etc/tope/device-api.toml\n");
    s.into_bytes()
}

/// The fixed bases, by selector: empty; text; 4 KiB of noise; 24 KiB code-like; one larger
/// than a reference (`DELTA_REF_BYTES_MAX` + 256 KiB), so windows refer to a part of it.
pub const FIXED_BASES: u8 = 5;
pub const BIG_BASE: u8 = 4;

pub fn fixed_base(i: u8) -> Vec<u8> {
    match i {
        0 => Vec::new(),
        1 => text(),
        2 => noise(4096, 2),
        3 => code_like(24 * 1024, 3),
        4 => {
            let mut b = code_like(DELTA_REF_BYTES_MAX as usize + 256 * 1024, 4);
            // Some runs of zeros, as a real image has.
            for k in 0..8 {
                let at = k * 1_000_003 + 4096;
                b[at..at + 8192].fill(0);
            }
            b
        }
        _ => panic!("no fixed base {i}"),
    }
}

/// A base file and its size.
pub struct Base {
    pub file: File,
    pub size: u64,
}

/// An unlinked file holding `bytes` (nothing is left behind when the process ends).
fn anonymous_file(bytes: &[u8], tag: &str) -> File {
    let path = crate::scratch_dir().join(format!("delta-{tag}-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.write_all_at(bytes, 0).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

pub fn fixed_base_file(i: u8) -> &'static Base {
    static BASES: OnceLock<Vec<OnceLock<Base>>> = OnceLock::new();
    let all = BASES.get_or_init(|| (0..FIXED_BASES).map(|_| OnceLock::new()).collect());
    all[i as usize].get_or_init(|| {
        let bytes = fixed_base(i);
        Base { file: anonymous_file(&bytes, &format!("base{i}")), size: bytes.len() as u64 }
    })
}

/// A base taken from the input, rewritten in place on every call (one per process).
pub fn input_base_file(bytes: &[u8]) -> Base {
    static FILE: OnceLock<File> = OnceLock::new();
    let f = FILE.get_or_init(|| anonymous_file(&[], "input-base"));
    f.set_len(0).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    Base { file: f.try_clone().unwrap(), size: bytes.len() as u64 }
}

// ---- the raw input layout of `delta_apply` ----

/// byte 0: bits 0-2 select the base (0-4 the fixed bases, 5-7 a base taken from the input);
/// bytes 1-4: the declared target size, u32 little-endian (the caller's bound,
/// `max_unpacked_bytes`, is 4 GiB by default);
/// for an input base: 2 bytes of length (u16 LE, at most `INPUT_BASE_MAX`) and the base;
/// the rest: the patch.
pub const INPUT_BASE: u8 = 5;
pub const INPUT_BASE_MAX: usize = 16 * 1024;

pub struct RawInput<'a> {
    pub base: Result<u8, &'a [u8]>,
    pub declared: u64,
    pub patch: &'a [u8],
}

pub fn split_raw(data: &[u8]) -> Option<RawInput<'_>> {
    let (&flags, rest) = data.split_first()?;
    let declared = u32::from_le_bytes(rest.get(..4)?.try_into().unwrap()) as u64;
    let rest = &rest[4..];
    let sel = flags & 7;
    let (base, patch) = if sel < INPUT_BASE {
        (Ok(sel), rest)
    } else {
        let len = (u16::from_le_bytes(rest.get(..2)?.try_into().unwrap()) as usize).min(INPUT_BASE_MAX).min(rest.len() - 2);
        (Err(&rest[2..2 + len]), &rest[2 + len..])
    };
    Some(RawInput { base, declared, patch })
}

pub fn join_raw(base: Result<u8, &[u8]>, declared: u32, patch: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(match base {
        Ok(i) => i,
        Err(_) => INPUT_BASE,
    });
    out.extend_from_slice(&declared.to_le_bytes());
    if let Err(b) = base {
        assert!(b.len() <= INPUT_BASE_MAX);
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(b);
    }
    out.extend_from_slice(patch);
    out
}

// ---- applying and checking ----

/// The output of `apply`: counts every byte, panics as soon as more than the declared size
/// is written, and hashes what it is given when asked to.
struct Sink {
    written: u64,
    declared: u64,
    hasher: Option<blake3::Hasher>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len() as u64;
        assert!(self.written <= self.declared, "apply wrote {} bytes, more than the {} declared", self.written, self.declared);
        if let Some(h) = &mut self.hasher {
            h.update(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Applied {
    pub result: Result<(), PatchError>,
    pub written: u64,
    /// The blake3 of the output, when asked for.
    pub output: Option<Hash>,
    pub peak_heap: u64,
}

/// Applies `patch` to `base` for a target of `declared` bytes, writing into a counting sink,
/// and checks: no panic (the caller is a fuzz target: a panic is the crash); never more than
/// `declared` bytes written; on success exactly `declared`, and the patch reads whole with the
/// mirror (nothing after its last window); never a `Write` error (the sink does not fail);
/// the heap peak within the windows' budget and within limits.rs's.
pub fn check_apply(patch: &[u8], base: &Base, declared: u64, hash_output: bool) -> Applied {
    let budget = window_budget(patch, base.size, declared);
    let mut sink = Sink { written: 0, declared, hasher: hash_output.then(blake3::Hasher::new) };
    let (result, peak_heap) = peak_heap_of(|| delta::apply(&mut &patch[..], &base.file, declared, &mut sink));
    assert!(
        peak_heap <= LIMITS_BUDGET + slack(0),
        "applying a patch peaked at {peak_heap} bytes of heap, over limits.rs's {LIMITS_BUDGET} ({result:?})"
    );
    assert!(
        peak_heap <= budget,
        "applying a patch peaked at {peak_heap} bytes of heap; its windows (reference + payload + stream + output) \
         account for {budget} with slack ({result:?})"
    );
    match &result {
        Ok(()) => {
            assert_eq!(sink.written, declared, "apply succeeded with {} bytes written, {declared} declared", sink.written);
            let p = parse(patch, delta::spans(declared, base.size).len());
            assert!(p.complete && p.end == patch.len(), "apply accepted a patch the format mirror does not read whole: {p:?}");
        }
        Err(PatchError::Write(e)) => panic!("a Write error from a sink that never fails: {e}"),
        Err(_) => {}
    }
    Applied { result, written: sink.written, output: sink.hasher.map(|h| h.finalize().into()), peak_heap }
}

// ---- building payloads (the structured target) ----

fn zstd_err(code: usize) -> String {
    zstd::zstd_safe::get_error_name(code).to_string()
}

/// One zstd frame of `data` with `prefix` (may be empty), at a fast level, optionally without
/// the content size or with a checksum.
pub fn zstd_frame(prefix: &[u8], data: &[u8], level: i32, content_size: bool, checksum: bool) -> Vec<u8> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    let total = prefix.len() as u64 + data.len() as u64;
    let wlog = (64 - total.max(1).saturating_sub(1).leading_zeros()).clamp(10, 24);
    for p in [
        CParameter::CompressionLevel(level),
        CParameter::WindowLog(wlog),
        CParameter::ContentSizeFlag(content_size),
        CParameter::ChecksumFlag(checksum),
    ] {
        cctx.set_parameter(p).map_err(zstd_err).unwrap();
    }
    if !prefix.is_empty() {
        cctx.ref_prefix(prefix).map_err(zstd_err).unwrap();
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).map_err(zstd_err).unwrap();
    out
}

/// A zstd skippable frame of `len` bytes of content.
pub fn skippable_frame(len: u32, fill: u8) -> Vec<u8> {
    let mut out = 0x184D_2A50u32.to_le_bytes().to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.resize(8 + len as usize, fill);
    out
}

/// One bsdiff control entry: `mix` bytes added to the reference, `copy` bytes copied, then
/// the reference position moved by `seek` (sign-magnitude, as bsdiff writes it).
pub fn bsdiff_control(out: &mut Vec<u8>, mix: u64, copy: u64, seek: i64) {
    out.extend_from_slice(&mix.to_le_bytes());
    out.extend_from_slice(&copy.to_le_bytes());
    let s = if seek < 0 { seek.unsigned_abs() | 1 << 63 } else { seek as u64 };
    out.extend_from_slice(&s.to_le_bytes());
}

// ---- seeds ----

/// `make_patch` of `target` against `base` (no size cap), checked: it applies to exactly
/// `target` and the mirror reads it whole.
pub fn seed_patch(base: &[u8], target: &[u8]) -> Vec<u8> {
    let (b, t) = (anonymous_file(base, "seed-base"), anonymous_file(target, "seed-target"));
    let (bn, tn) = (base.len() as u64, target.len() as u64);
    let patch = delta::make_patch(&b, bn, &t, tn, u64::MAX).unwrap().unwrap();
    let mut out = Vec::new();
    delta::apply(&mut patch.as_slice(), &b, tn, &mut out).unwrap();
    assert!(out == target, "a seed patch does not reproduce its target");
    let p = parse(&patch, delta::spans(tn, bn).len());
    assert!(p.complete && p.end == patch.len(), "the format mirror does not read make_patch's output: {p:?}");
    patch
}
