//! Delta patches built from an `Arbitrary` description: window headers written with the
//! format mirror, payloads compressed here (zstd frames with the window's reference as prefix,
//! without one or with another, bsdiff control streams with arbitrary lengths and seeks,
//! skippable frames, extra frames, junk), then damaged (lying payload lengths, swapped
//! methods, flipped bytes, truncation, trailing bytes, a window too many, applied for another
//! declared size or to other content of the base's size). Byte mutation rarely gets through
//! a zstd frame; this reaches the bsdiff interpreter and the frame checks with well-formed
//! compressed data.
//!
//! Checked, besides `check_apply`'s properties (no panic, never more than the declared size
//! written, exactly it on success, heap within the windows' budget and limits.rs's): a patch
//! whose every part is honest is accepted, and a patch that is accepted while every window's
//! content is known produces exactly that content.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tope_updater::delta::spans;
use tope_updater::engine::Hash;
use tope_updater::limits::{DELTA_BSDIFF_STREAM_BYTES_MAX, DELTA_PAYLOAD_BYTES_MAX, DELTA_WINDOW_BYTES};
use tope_updater_fuzz::delta::{self as d, CountingAlloc, Method, WindowHeader};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Content and streams are capped a little above the stream limit (time per run).
const CONTENT_MAX: u64 = DELTA_BSDIFF_STREAM_BYTES_MAX + 1024 * 1024;

#[derive(Arbitrary, Debug)]
enum BaseSpec {
    Fixed(u8),
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    base: BaseSpec,
    /// Mostly less than a window; sometimes 1-3 whole windows more.
    whole_windows: u8,
    tail: u32,
    tweak: Option<Tweak>,
    windows: Vec<WindowSpec>,
    extra_window: bool,
    trailing: Vec<u8>,
    cut: Option<u16>,
}

/// How the patch is applied other than as it was built.
#[derive(Arbitrary, Debug)]
enum Tweak {
    /// For another declared target size (other windows).
    Declared(i32),
    /// To other content of the base's size (one byte changed).
    OtherBase { at: u32, xor: u8 },
}

#[derive(Arbitrary, Debug)]
struct WindowSpec {
    swap_method: bool,
    payload: PayloadSpec,
    damage: Option<Damage>,
}

#[derive(Arbitrary, Debug)]
enum PayloadSpec {
    Zstd { content: Content, prefix: PrefixSpec, level: u8, no_size: bool, checksum: bool, suffix: Suffix },
    Bsdiff { controls: Vec<Control>, no_size: bool, suffix: Suffix },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum PrefixSpec {
    /// The window's reference (what `make_patch` uses).
    Reference,
    None,
    /// Another span of the base, or other bytes.
    At {
        offset: u32,
        len: u32,
    },
    Other(u8),
}

#[derive(Arbitrary, Debug)]
enum Suffix {
    None,
    Skippable(u16),
    Frame(u16),
    Junk(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Content {
    kind: Kind,
    len: LenSpec,
}

#[derive(Arbitrary, Debug, Clone)]
enum Kind {
    Fill(u8),
    Pattern(Vec<u8>),
    /// The reference, cycled, with every `every`-th byte changed by `xor` (a patched binary).
    Reference {
        xor: u8,
        every: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum LenSpec {
    Exact,
    Off(i16),
    Any(u32),
}

#[derive(Arbitrary, Debug)]
struct Control {
    mix: Len,
    copy: Len,
    seek: i32,
    data: Kind,
}

#[derive(Arbitrary, Debug)]
enum Len {
    /// What is left to produce (for `mix`: also what is left of the reference).
    Rest,
    Small(u8),
    Mid(u16),
    Big(u32),
    Huge(u64),
}

#[derive(Arbitrary, Debug)]
enum Damage {
    PayloadLen(i16),
    Flip { at: u32, xor: u8 },
    Cut(u16),
}

fn bytes_of(kind: &Kind, len: usize, reference: &[u8]) -> Vec<u8> {
    match kind {
        Kind::Fill(b) => vec![*b; len],
        Kind::Pattern(p) if !p.is_empty() => p.iter().copied().cycle().take(len).collect(),
        Kind::Pattern(_) => vec![0; len],
        Kind::Reference { xor, every } => {
            let src = if reference.is_empty() { d::noise(4096, *xor as u64) } else { reference.to_vec() };
            let every = *every as usize % 64 + 1;
            src.iter().copied().cycle().take(len).enumerate().map(|(i, b)| if i % every == 0 { b ^ xor } else { b }).collect()
        }
    }
}

/// One window: its header and payload, and the bytes it must produce if `apply` accepts it
/// (`None`: unknown, or it must not be accepted).
struct Built {
    header: WindowHeader,
    payload: Vec<u8>,
    expected: Option<Vec<u8>>,
}

fn build_window(spec: &WindowSpec, span: &tope_updater::delta::Span, base: &[u8]) -> Built {
    let reference = &base[span.ref_offset as usize..(span.ref_offset + span.ref_len) as usize];
    let out_len = span.out_len as usize;
    let (method, mut payload, mut expected) = match &spec.payload {
        PayloadSpec::Zstd { content, prefix, level, no_size, checksum, suffix } => {
            let len = match content.len {
                LenSpec::Exact => out_len,
                LenSpec::Off(o) => (out_len as i64 + o as i64).max(0) as usize,
                LenSpec::Any(n) => (n as u64 % CONTENT_MAX) as usize,
            };
            let data = bytes_of(&content.kind, len, reference);
            let other;
            let (prefix_bytes, prefix_matches): (&[u8], bool) = match *prefix {
                PrefixSpec::Reference => (reference, true),
                PrefixSpec::None => (&[], true),
                PrefixSpec::At { offset, len } => {
                    let start = (offset as usize).min(base.len());
                    let p = &base[start..(start + len as usize % (DELTA_WINDOW_BYTES as usize)).min(base.len())];
                    (p, p == reference)
                }
                PrefixSpec::Other(x) => {
                    other = bytes_of(&Kind::Reference { xor: x | 1, every: 1 }, reference.len().max(64), reference);
                    (&other, false)
                }
            };
            let mut frame = d::zstd_frame(prefix_bytes, &data, 1 + (*level % 3) as i32, !no_size, *checksum);
            let mut known = prefix_matches && !no_size && data.len() == out_len;
            known &= add_suffix(&mut frame, suffix);
            (Method::Zstd, frame, known.then_some(data))
        }
        PayloadSpec::Bsdiff { controls, no_size, suffix } => {
            let stream = bsdiff_stream(controls, out_len, reference);
            let mut frame = d::zstd_frame(&[], &stream, 1, !no_size, false);
            let mut out = Vec::new();
            let patched = bsdiff::patch(reference, &mut stream.as_slice(), &mut out).is_ok();
            let mut known = patched && out.len() == out_len && !no_size && stream.len() as u64 <= DELTA_BSDIFF_STREAM_BYTES_MAX;
            known &= add_suffix(&mut frame, suffix);
            (Method::BsdiffZstd, frame, known.then_some(out))
        }
        PayloadSpec::Raw(bytes) => (Method::Zstd, bytes.clone(), None),
    };
    let method = match (spec.swap_method, method) {
        (false, m) => m,
        (true, Method::Zstd) => Method::BsdiffZstd,
        (true, Method::BsdiffZstd) => Method::Zstd,
    };
    if spec.swap_method || payload.len() as u64 > DELTA_PAYLOAD_BYTES_MAX {
        expected = None;
    }
    let mut payload_len = payload.len() as u64;
    match spec.damage {
        None => {}
        Some(Damage::PayloadLen(o)) => {
            payload_len = (payload_len as i64 + o as i64).max(0) as u64;
            if o != 0 {
                expected = None;
            }
        }
        Some(Damage::Flip { at, xor }) => {
            if !payload.is_empty() && xor != 0 {
                let i = at as usize % payload.len();
                payload[i] ^= xor;
                expected = None;
            }
        }
        Some(Damage::Cut(n)) => {
            if n != 0 && !payload.is_empty() {
                payload.truncate(payload.len().saturating_sub(n as usize));
                payload_len = payload.len() as u64;
                expected = None;
            }
        }
    }
    Built { header: WindowHeader { method, payload_len }, payload, expected }
}

/// Appends the suffix; whether the window still decodes to what it did.
fn add_suffix(frame: &mut Vec<u8>, suffix: &Suffix) -> bool {
    match suffix {
        Suffix::None => true,
        Suffix::Skippable(n) => {
            // A window's payload is exactly one frame: anything after it is refused.
            frame.extend_from_slice(&d::skippable_frame(*n as u32, 0xa5));
            false
        }
        Suffix::Frame(n) => {
            frame.extend_from_slice(&d::zstd_frame(&[], &vec![7u8; *n as usize], 1, true, false));
            false
        }
        Suffix::Junk(j) => {
            frame.extend_from_slice(j);
            j.is_empty()
        }
    }
}

fn bsdiff_stream(controls: &[Control], out_len: usize, reference: &[u8]) -> Vec<u8> {
    let mut stream = Vec::new();
    if controls.is_empty() {
        // Honest: the reference's bytes as they are, then copied bytes.
        let mix = out_len.min(reference.len());
        d::bsdiff_control(&mut stream, mix as u64, (out_len - mix) as u64, 0);
        stream.resize(stream.len() + mix, 0);
        stream.extend(bytes_of(&Kind::Fill(0x5a), out_len - mix, reference));
        return stream;
    }
    let (mut produced, mut oldpos) = (0u64, 0i64);
    for c in controls {
        let left = (out_len as u64).saturating_sub(produced);
        let resolve = |l: &Len, rest: u64| match *l {
            Len::Rest => rest,
            Len::Small(n) => n as u64,
            Len::Mid(n) => n as u64,
            Len::Big(n) => n as u64 % CONTENT_MAX,
            Len::Huge(n) => n,
        };
        let mix = resolve(&c.mix, left.min((reference.len() as i64 - oldpos).max(0) as u64));
        let copy = resolve(&c.copy, left.saturating_sub(mix));
        d::bsdiff_control(&mut stream, mix, copy, c.seek as i64);
        // The data: up to the cap (a longer claim is then a truncated stream).
        let room = (CONTENT_MAX as usize).saturating_sub(stream.len());
        let data_len = (mix.saturating_add(copy)).min(room as u64) as usize;
        stream.extend(bytes_of(&c.data, data_len, reference));
        if data_len == room {
            break;
        }
        produced = produced.saturating_add(mix).saturating_add(copy);
        oldpos = oldpos.saturating_add(mix as i64).saturating_add(c.seek as i64);
    }
    stream
}

fuzz_target!(|input: Input| {
    let owned;
    let base: &d::Base = match &input.base {
        BaseSpec::Fixed(i) => d::fixed_base_file(i % d::FIXED_BASES),
        BaseSpec::Bytes(b) => {
            owned = d::input_base_file(&b[..b.len().min(64 * 1024)]);
            &owned
        }
    };
    let base_bytes = match &input.base {
        BaseSpec::Fixed(i) => cached_fixed_base(i % d::FIXED_BASES),
        BaseSpec::Bytes(b) => std::borrow::Cow::Borrowed(&b[..b.len().min(64 * 1024)]),
    };
    let whole = match input.whole_windows {
        0..=191 => 0,
        192..=239 => 1,
        240..=251 => 2,
        _ => 3,
    };
    let tail = input.tail as u64 % if input.tail & 1 << 31 != 0 { DELTA_WINDOW_BYTES } else { 64 * 1024 };
    let declared = whole * DELTA_WINDOW_BYTES + tail;
    let spans = spans(declared, base.size);
    let mut patch = Vec::new();
    let mut honest = true;
    let mut expected = Some(blake3::Hasher::new());
    let pad = WindowSpec {
        swap_method: false,
        payload: PayloadSpec::Zstd {
            content: Content { kind: Kind::Fill(0), len: LenSpec::Exact },
            prefix: PrefixSpec::None,
            level: 0,
            no_size: false,
            checksum: false,
            suffix: Suffix::None,
        },
        damage: None,
    };
    for (i, span) in spans.iter().enumerate() {
        let w = build_window(input.windows.get(i).unwrap_or(&pad), span, &base_bytes);
        d::encode(&w.header, &mut patch);
        patch.extend_from_slice(&w.payload);
        match (&mut expected, &w.expected) {
            (Some(h), Some(bytes)) => {
                h.update(bytes);
            }
            _ => expected = None,
        }
    }
    if input.extra_window {
        let w = build_window(&pad, &tope_updater::delta::Span { out_offset: 0, out_len: 1, ref_offset: 0, ref_len: 0 }, &[]);
        d::encode(&w.header, &mut patch);
        patch.extend_from_slice(&w.payload);
        honest = false;
    }
    patch.extend_from_slice(&input.trailing);
    honest &= input.trailing.is_empty();
    if let Some(n) = input.cut {
        patch.truncate(patch.len().saturating_sub(n as usize));
        honest &= n == 0;
    }
    let expected: Option<Hash> = expected.map(|h| h.finalize().into());
    honest &= expected.is_some();

    // Applied as built, or for another declared size, or to other content of the base's size.
    let (other_base, other_declared);
    let (base, declared, as_built) = match input.tweak {
        None => (base, declared, true),
        Some(Tweak::Declared(o)) => {
            other_declared = (declared as i64 + o as i64).clamp(0, 3 * DELTA_WINDOW_BYTES as i64 + 65536) as u64;
            (base, other_declared, other_declared == declared)
        }
        Some(Tweak::OtherBase { at, xor }) => {
            let mut b = base_bytes.to_vec();
            if !b.is_empty() {
                let i = at as usize % b.len();
                b[i] ^= xor;
            }
            other_base = d::input_base_file(&b);
            (&other_base, declared, b.is_empty() || xor == 0)
        }
    };
    let applied = d::check_apply(&patch, base, declared, true);
    if honest && as_built {
        assert!(applied.result.is_ok(), "an honest patch was refused: {:?}", applied.result);
    }
    if applied.result.is_ok()
        && as_built
        && let Some(e) = expected
    {
        assert_eq!(applied.output, Some(e), "an accepted patch produced other bytes than its windows hold");
    }
});

/// The fixed bases' bytes, made once per process.
fn cached_fixed_base(i: u8) -> std::borrow::Cow<'static, [u8]> {
    use std::sync::OnceLock;
    static B: [OnceLock<Vec<u8>>; d::FIXED_BASES as usize] = [const { OnceLock::new() }; d::FIXED_BASES as usize];
    std::borrow::Cow::Borrowed(B[i as usize].get_or_init(|| d::fixed_base(i)).as_slice())
}
