//! Delta patches: the format of one patch entry, making one (`pack --delta-from`) and applying
//! one (staging). Pure byte work: no journal, no paths; staging hashes what comes out and
//! checks it against the target blake3 the signed manifest pins.
//!
//! A patch is one `WindowHeader` and its payload per window, nothing else: the manifest
//! (signed) names the format (`delta.format`), the base's blake3 and the target's size and
//! blake3, and the base's size is the size of the content found by that hash. Window `i`
//! produces target bytes `[i·W, min((i+1)·W, size))` (W = `DELTA_WINDOW_BYTES`) from a
//! *reference*: the span of the base that `spans` derives from the two sizes alone, at most
//! `DELTA_REF_BYTES_MAX` bytes around the window's proportional position in the base. So
//! applying one holds one reference, one payload, one decoded stream and one window of output,
//! whatever the file size (limits.rs: 24 MiB), and the whole base is never read into memory.
//! Each window is encoded by whichever method is smaller:
//! - `Zstd`: a zstd frame compressed with the reference as its prefix (`--patch-from`);
//! - `BsdiffZstd`: bsdiff's control/diff/extra stream against the reference, zstd-compressed.
//!
//! The headers are bincode (standard configuration, size-limited), a few bytes per window: a
//! patch costs no more than the zstd frames it holds, so a file's patch is no larger than
//! `zstd --patch-from`'s. Every field is checked against the limits before anything is
//! allocated: a hostile patch is an error, never a large allocation or an output longer than
//! declared. A patch made for other content (a forged manifest) yields an error or other
//! bytes, which the target hash refuses.

use crate::limits::{
    DELTA_BSDIFF_STREAM_BYTES_MAX, DELTA_HEADER_BYTES_MAX, DELTA_PAYLOAD_BYTES_MAX,
    DELTA_REF_BYTES_MAX, DELTA_REF_MARGIN_BYTES, DELTA_WINDOW_BYTES, DELTA_ZSTD_WINDOW_LOG_MAX,
};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Method {
    Zstd,
    BsdiffZstd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WindowHeader {
    method: Method,
    payload_len: u64,
}

/// Why a patch could not be applied.
#[derive(Debug)]
pub enum PatchError {
    /// The patch breaks the format or a limit: the package is malformed or hostile.
    Invalid(String),
    /// The patch decodes to something other than it declares (damaged bytes).
    Corrupt(String),
    /// Reading the patch entry failed.
    Read(std::io::Error),
    /// Reading the base failed.
    Base(String),
    /// Writing the output failed.
    Write(std::io::Error),
}

const HEADER_CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DELTA_HEADER_BYTES_MAX>,
> = bincode::config::standard().with_limit::<DELTA_HEADER_BYTES_MAX>();

/// One window's output span and the base span it refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub out_offset: u64,
    pub out_len: u64,
    pub ref_offset: u64,
    pub ref_len: u64,
}

/// How a target of `target_size` bytes is cut into windows, and which span of a base of
/// `base_size` bytes each one refers to: the window's proportional position in the base
/// (content that grew or shrank stays aligned) widened by the margin on both sides, clipped
/// to the base. A base that fits in one reference is referred to whole.
pub fn spans(target_size: u64, base_size: u64) -> Vec<Span> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < target_size {
        let len = DELTA_WINDOW_BYTES.min(target_size - off);
        let (ref_offset, ref_len) = if base_size <= DELTA_REF_BYTES_MAX {
            (0, base_size)
        } else {
            let centre = (u128::from(off) * u128::from(base_size) / u128::from(target_size)) as u64;
            let start = centre
                .saturating_sub(DELTA_REF_MARGIN_BYTES)
                .min(base_size - DELTA_REF_BYTES_MAX.min(base_size));
            (start, DELTA_REF_BYTES_MAX.min(base_size - start))
        };
        out.push(Span { out_offset: off, out_len: len, ref_offset, ref_len });
        off += len;
    }
    out
}

fn read_span(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn zstd_err(what: &str, code: usize) -> String {
    format!("{what}: {}", zstd::zstd_safe::get_error_name(code))
}

/// Window log a frame of `reference + output` bytes needs (zstd's minimum is 10).
fn window_log(bytes: u64) -> u32 {
    (64 - bytes.max(1).saturating_sub(1).leading_zeros()).clamp(10, DELTA_ZSTD_WINDOW_LOG_MAX)
}

/// zstd at `level` of `data` with `reference` as its prefix, long-distance matching on or off.
fn zstd_with_prefix(
    reference: &[u8],
    data: &[u8],
    level: i32,
    long_distance: bool,
) -> Result<Vec<u8>, String> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    let set = |c: &mut CCtx, p: CParameter| {
        c.set_parameter(p).map(|_| ()).map_err(|e| zstd_err("zstd parameter", e))
    };
    set(&mut cctx, CParameter::CompressionLevel(level))?;
    set(&mut cctx, CParameter::WindowLog(window_log(reference.len() as u64 + data.len() as u64)))?;
    set(&mut cctx, CParameter::EnableLongDistanceMatching(long_distance))?;
    set(&mut cctx, CParameter::ContentSizeFlag(true))?;
    set(&mut cctx, CParameter::ChecksumFlag(false))?;
    if !reference.is_empty() {
        cctx.ref_prefix(reference).map_err(|e| zstd_err("zstd prefix", e))?;
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).map_err(|e| zstd_err("zstd", e))?;
    Ok(out)
}

/// Decodes one zstd frame of exactly `out_len` bytes, with `reference` as its prefix.
fn unzstd(reference: &[u8], payload: &[u8], out_len: u64) -> Result<Vec<u8>, PatchError> {
    use zstd::zstd_safe::{DCtx, DParameter};
    match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n == out_len => {}
        Ok(Some(n)) => {
            return Err(PatchError::Invalid(format!(
                "a window declares {out_len} bytes but its frame holds {n}"
            )));
        }
        _ => {
            return Err(PatchError::Invalid(
                "a window's zstd frame does not state its size".into(),
            ));
        }
    }
    // Exactly one frame: anything after it (another frame, a skippable one) is not part of
    // the format.
    if zstd::zstd_safe::find_frame_compressed_size(payload).ok() != Some(payload.len()) {
        return Err(PatchError::Invalid("a window's payload is not exactly one zstd frame".into()));
    }
    let mut dctx = DCtx::create();
    dctx.set_parameter(DParameter::WindowLogMax(DELTA_ZSTD_WINDOW_LOG_MAX))
        .map_err(|e| PatchError::Invalid(zstd_err("zstd", e)))?;
    if !reference.is_empty() {
        dctx.ref_prefix(reference).map_err(|e| PatchError::Invalid(zstd_err("zstd prefix", e)))?;
    }
    // The output buffer is the frame's whole window (one-shot decoding allocates none of its
    // own) and is never grown: a frame that would write more fails.
    let mut out = Vec::with_capacity(out_len as usize);
    let n =
        dctx.decompress(&mut out, payload).map_err(|e| PatchError::Corrupt(zstd_err("zstd", e)))?;
    if n as u64 != out_len {
        return Err(PatchError::Corrupt(format!(
            "a window decodes to {n} bytes, {out_len} declared"
        )));
    }
    Ok(out)
}

/// The bsdiff stream of `data` against `reference`, zstd-compressed; `None` when the stream
/// would break the applier's limit.
fn bsdiff_zstd(reference: &[u8], data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut stream = Vec::new();
    bsdiff::diff(reference, data, &mut stream).map_err(|e| format!("bsdiff: {e}"))?;
    if stream.len() as u64 > DELTA_BSDIFF_STREAM_BYTES_MAX {
        return Ok(None);
    }
    zstd_with_prefix(&[], &stream, 19, true).map(Some)
}

/// Applies one bsdiff stream (zstd-compressed in `payload`) to `reference`.
fn unbsdiff(reference: &[u8], payload: &[u8], out_len: u64) -> Result<Vec<u8>, PatchError> {
    let stream_len = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n <= DELTA_BSDIFF_STREAM_BYTES_MAX => n,
        Ok(Some(n)) => {
            return Err(PatchError::Invalid(format!(
                "a bsdiff stream of {n} bytes is over the limit of {DELTA_BSDIFF_STREAM_BYTES_MAX}"
            )));
        }
        _ => {
            return Err(PatchError::Invalid(
                "a window's zstd frame does not state its size".into(),
            ));
        }
    };
    let stream = unzstd(&[], payload, stream_len)?;
    // The entries must add up to exactly the window before any is applied: bsdiff grows its
    // output as it reads, so a stream promising more would allocate past the bound first
    // (found by fuzz/delta_structured). Each entry's reads of the reference are checked by
    // bsdiff itself.
    if bsdiff_output_len(&stream) != Some(out_len) {
        return Err(PatchError::Invalid(format!(
            "a bsdiff stream that does not make exactly its window of {out_len} bytes"
        )));
    }
    let mut out = Vec::with_capacity(out_len as usize);
    bsdiff::patch(reference, &mut stream.as_slice(), &mut out)
        .map_err(|e| PatchError::Corrupt(format!("bsdiff: {e}")))?;
    if out.len() as u64 != out_len {
        return Err(PatchError::Corrupt(format!(
            "a window decodes to {} bytes, {out_len} declared",
            out.len()
        )));
    }
    Ok(out)
}

/// The bytes a bsdiff stream (24-byte control entries `mix_len:u64le copy_len:u64le
/// seek:i64`, each followed by its `mix_len + copy_len` bytes) produces, if it is well formed.
fn bsdiff_output_len(stream: &[u8]) -> Option<u64> {
    let (mut pos, mut total) = (0usize, 0u64);
    while pos < stream.len() {
        let control = stream.get(pos..pos.checked_add(24)?)?;
        let mix = u64::from_le_bytes(control[0..8].try_into().ok()?);
        let copy = u64::from_le_bytes(control[8..16].try_into().ok()?);
        let n = mix.checked_add(copy)?;
        total = total.checked_add(n)?;
        pos = pos.checked_add(24)?.checked_add(usize::try_from(n).ok()?)?;
    }
    (pos == stream.len()).then_some(total)
}

/// Whether a window is small, or its quick zstd patch large enough, that more effort may pay:
/// a large window that barely changed (a firmware image with a few blocks rewritten) is a few
/// literals that zstd -19 and bsdiff would not shrink, at 100 times the time (2.7 s against 27 ms
/// at level 1 for a window of random data with one changed block, measured; for a relinked
/// library -19 and bsdiff save a third or more).
fn worth_more_effort(quick_len: usize, out_len: usize) -> bool {
    // A window of at most 1 MiB costs milliseconds at -19, and small files are where a few
    // hundred bytes are a large share.
    out_len <= 1 << 20 || quick_len * 64 > out_len
}

/// Makes the patch that turns `base` (`base_size` bytes) into `target` (`target_size` bytes).
/// Returns `None` as soon as it reaches `give_up_at` bytes (the full entry is the better choice
/// then).
pub fn make_patch(
    base: &File,
    base_size: u64,
    target: &File,
    target_size: u64,
    give_up_at: u64,
) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    for s in spans(target_size, base_size) {
        let reference =
            read_span(base, s.ref_offset, s.ref_len).map_err(|e| format!("read base: {e}"))?;
        let data =
            read_span(target, s.out_offset, s.out_len).map_err(|e| format!("read target: {e}"))?;
        let mut best = (Method::Zstd, zstd_with_prefix(&reference, &data, 1, true)?);
        if worth_more_effort(best.1.len(), data.len()) {
            // -19 with and without long-distance matching: the zstd CLI's --patch-from turns
            // it on only for inputs past the match finder's reach, and on small windows it
            // costs a few hundred bytes as often as it saves them.
            for long_distance in [true, false] {
                let strong = zstd_with_prefix(&reference, &data, 19, long_distance)?;
                if strong.len() < best.1.len() {
                    best = (Method::Zstd, strong);
                }
            }
            if let Some(b) = bsdiff_zstd(&reference, &data)?
                && b.len() < best.1.len()
            {
                best = (Method::BsdiffZstd, b);
            }
        }
        let (method, payload) = best;
        if payload.len() as u64 > DELTA_PAYLOAD_BYTES_MAX {
            return Ok(None);
        }
        let w = WindowHeader { method, payload_len: payload.len() as u64 };
        bincode::serde::encode_into_std_write(&w, &mut out, HEADER_CONFIG)
            .map_err(|e| e.to_string())?;
        out.extend_from_slice(&payload);
        if out.len() as u64 >= give_up_at {
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// One patch application at a time in this process: the memory bound of limits.rs holds
/// whatever number of staging workers run.
static APPLYING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Applies `patch` to `base` (the content the manifest names as the patch's base; the caller
/// checks the output against the target hash), writing exactly `target_size` bytes to `out`.
pub fn apply(
    patch: &mut impl Read,
    base: &File,
    target_size: u64,
    out: &mut impl Write,
) -> Result<(), PatchError> {
    let base_size = base.metadata().map_err(|e| PatchError::Base(format!("stat: {e}")))?.len();
    let _one_at_a_time = APPLYING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for span in spans(target_size, base_size) {
        let w: WindowHeader = decode(patch)?;
        if w.payload_len > DELTA_PAYLOAD_BYTES_MAX {
            return Err(PatchError::Invalid(format!(
                "a window's payload of {} bytes is over the limit",
                w.payload_len
            )));
        }
        let reference = read_span(base, span.ref_offset, span.ref_len)
            .map_err(|e| PatchError::Base(format!("read: {e}")))?;
        let mut payload = vec![0u8; w.payload_len as usize];
        patch.read_exact(&mut payload).map_err(PatchError::Read)?;
        let data = match w.method {
            Method::Zstd => unzstd(&reference, &payload, span.out_len)?,
            Method::BsdiffZstd => unbsdiff(&reference, &payload, span.out_len)?,
        };
        out.write_all(&data).map_err(PatchError::Write)?;
    }
    // Anything after the last window means the entry is not what it declares.
    let mut probe = [0u8; 1];
    match patch.read(&mut probe) {
        Ok(0) => Ok(()),
        Ok(_) => Err(PatchError::Invalid("bytes after the last window".into())),
        Err(e) => Err(PatchError::Read(e)),
    }
}

fn decode<T: serde::de::DeserializeOwned>(patch: &mut impl Read) -> Result<T, PatchError> {
    bincode::serde::decode_from_std_read(patch, HEADER_CONFIG).map_err(|e| match e {
        bincode::error::DecodeError::Io { inner, .. } => PatchError::Read(inner),
        e => PatchError::Invalid(format!("patch header: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    use crate::testdata::noise;

    fn roundtrip(base: &[u8], target: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (b, t) = (file_with(base), file_with(target));
        let patch =
            make_patch(&b, base.len() as u64, &t, target.len() as u64, u64::MAX).unwrap().unwrap();
        let mut out = Vec::new();
        apply(&mut patch.as_slice(), &b, target.len() as u64, &mut out).unwrap();
        (patch, out)
    }

    #[test]
    fn a_small_change_makes_a_small_patch_that_reproduces_the_target() {
        let base = noise(300_000, 7);
        let mut target = base.clone();
        target[1000..1100].copy_from_slice(&noise(100, 9));
        target.splice(5000..5000, noise(333, 11));
        let (patch, out) = roundtrip(&base, &target);
        assert_eq!(out, target);
        assert!(patch.len() < 2_000, "patch of {} bytes for ~450 changed bytes", patch.len());
    }

    #[test]
    fn a_large_file_is_patched_window_by_window_within_the_reference_bound() {
        // 10 MiB: three windows, a base larger than one reference.
        let base = noise(10 << 20, 3);
        let mut target = base.clone();
        for i in 0..16 {
            let at = i * 600_000 + 17;
            target[at..at + 4096].copy_from_slice(&noise(4096, i as u64 + 100));
        }
        let s = spans(target.len() as u64, base.len() as u64);
        assert_eq!(s.len(), 3);
        assert!(
            s.iter().all(|s| s.ref_len <= DELTA_REF_BYTES_MAX
                && s.ref_offset + s.ref_len <= base.len() as u64)
        );
        let (patch, out) = roundtrip(&base, &target);
        assert!(out == target, "output differs");
        assert!(patch.len() < 16 * 4096 + 16 * 1024, "patch of {} bytes", patch.len());
    }

    #[test]
    fn growing_shrinking_and_empty_files_roundtrip() {
        let base = noise(50_000, 5);
        for target in [Vec::new(), base[..10].to_vec(), [base.clone(), noise(70_000, 6)].concat()] {
            assert!(roundtrip(&base, &target).1 == target);
        }
        assert!(roundtrip(&[], b"from nothing").1 == b"from nothing");
    }

    #[test]
    fn spans_cover_the_target_exactly_and_follow_the_base_proportionally() {
        let s = spans(20 << 20, 40 << 20);
        assert_eq!(s.iter().map(|s| s.out_len).sum::<u64>(), 20 << 20);
        assert!(s.windows(2).all(|w| w[0].out_offset + w[0].out_len == w[1].out_offset));
        // The second window (target 4 MiB) sits at base 8 MiB, minus the margin.
        assert_eq!(s[1].ref_offset, 8 * 1024 * 1024 - DELTA_REF_MARGIN_BYTES);
        assert_eq!(spans(0, 100), Vec::new());
    }

    fn patch_for(base: &[u8], target: &[u8]) -> Vec<u8> {
        make_patch(
            &file_with(base),
            base.len() as u64,
            &file_with(target),
            target.len() as u64,
            u64::MAX,
        )
        .unwrap()
        .unwrap()
    }

    fn apply_to(patch: &[u8], base: &[u8], target_size: u64) -> Result<Vec<u8>, PatchError> {
        let mut out = Vec::new();
        apply(&mut &patch[..], &file_with(base), target_size, &mut out).map(|()| out)
    }

    #[test]
    fn hostile_patches_are_errors_not_allocations() {
        let base = noise(100_000, 1);
        let target = [&base[..50_000], b"changed", &base[50_000..]].concat();
        let good = patch_for(&base, &target);
        let n = target.len() as u64;
        assert!(apply_to(&good, &base, n).is_ok());
        // Other content of the same size as the base: an error, or other bytes (which the
        // target hash refuses); never the target.
        assert!(apply_to(&good, &noise(100_000, 2), n).map_or(true, |out| out != target));
        // Another declared size, an unknown method, trailing bytes, a truncation.
        assert!(matches!(apply_to(&good, &base, n + 1), Err(PatchError::Invalid(_))));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(apply_to(&bad, &base, n), Err(PatchError::Invalid(_))));
        assert!(matches!(
            apply_to(&[good.clone(), vec![0]].concat(), &base, n),
            Err(PatchError::Invalid(_))
        ));
        assert!(matches!(apply_to(&good[..good.len() - 3], &base, n), Err(PatchError::Read(_))));
        // Forged headers: an oversized payload, a frame that declares more output than its
        // window, a bsdiff stream over its bound.
        let forge = |w: WindowHeader, payload: &[u8]| {
            let mut p = Vec::new();
            bincode::serde::encode_into_std_write(&w, &mut p, HEADER_CONFIG).unwrap();
            p.extend_from_slice(payload);
            apply_to(&p, &base, 10)
        };
        let w = |method, payload_len| WindowHeader { method, payload_len };
        assert!(matches!(
            forge(w(Method::Zstd, DELTA_PAYLOAD_BYTES_MAX + 1), &[]),
            Err(PatchError::Invalid(_))
        ));
        let bomb = zstd_with_prefix(&[], &vec![0u8; 1 << 20], 3, true).unwrap();
        assert!(matches!(
            forge(w(Method::Zstd, bomb.len() as u64), &bomb),
            Err(PatchError::Invalid(_))
        ));
        let big_stream =
            zstd_with_prefix(&[], &vec![0u8; DELTA_BSDIFF_STREAM_BYTES_MAX as usize + 1], 3, true)
                .unwrap();
        assert!(matches!(
            forge(w(Method::BsdiffZstd, big_stream.len() as u64), &big_stream),
            Err(PatchError::Invalid(_))
        ));
        // A bsdiff stream whose entry promises more than its window (it would grow the
        // output before failing), and a payload with a second frame after the first.
        let mut stream = Vec::new();
        stream.extend(0u64.to_le_bytes());
        stream.extend((4u64 << 20).to_le_bytes());
        stream.extend(0i64.to_le_bytes());
        stream.extend(vec![0u8; 4 << 20]);
        let promising = zstd_with_prefix(&[], &stream, 3, true).unwrap();
        assert!(matches!(
            forge(w(Method::BsdiffZstd, promising.len() as u64), &promising),
            Err(PatchError::Invalid(_))
        ));
        let ten = zstd_with_prefix(&[], b"0123456789", 3, true).unwrap();
        let two_frames = [ten.clone(), ten.clone()].concat();
        assert!(matches!(
            forge(w(Method::Zstd, two_frames.len() as u64), &two_frames),
            Err(PatchError::Invalid(_))
        ));
        assert_eq!(forge(w(Method::Zstd, ten.len() as u64), &ten).unwrap(), b"0123456789");
        // A window of the right declared size but a payload that decodes to less.
        let short = zstd_with_prefix(&[], b"12345", 3, true).unwrap();
        assert!(matches!(
            forge(w(Method::Zstd, short.len() as u64), &short),
            Err(PatchError::Invalid(_))
        ));
    }
}
