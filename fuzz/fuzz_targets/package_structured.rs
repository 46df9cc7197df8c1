//! Packages built by the zip writer from structured input, so that inputs get past the ZIP
//! container and the CRCs (which raw-byte mutation rarely does) and exercise the manifest,
//! the entry checks and the destination policy: hostile names, symlink and directory
//! entries, destinations through the fixture symlinks in the allowed root, `..`, duplicates.
//! Byte flips and truncation after writing add container damage. Same invariants as
//! `package`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use tope_updater::engine::Hash;
use tope_updater_fuzz::ROOT;
use zip::write::SimpleFileOptions;

/// Path components worth trying: the fixtures in the allowed root and the hostile ones.
const COMPONENTS: [&str; 16] =
    ["a", "b", "dir", "sub", "file", "escape", "out", "alias", "dangling", "link", "..", ".", "", "etc", "passwd", "x y"];

#[derive(Arbitrary, Debug)]
enum Rel {
    Parts(Vec<u8>),
    Raw(String),
}

impl Rel {
    fn render(&self) -> String {
        match self {
            Rel::Parts(p) if p.is_empty() => "a".into(),
            Rel::Parts(p) => p.iter().take(6).map(|i| COMPONENTS[*i as usize % COMPONENTS.len()]).collect::<Vec<_>>().join("/"),
            Rel::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Dst {
    UnderRoot(Rel),
    Absolute(Rel),
    Raw(String),
}

impl Dst {
    fn render(&self) -> String {
        match self {
            Dst::UnderRoot(r) => format!("{ROOT}/{}", r.render()),
            Dst::Absolute(r) => format!("/{}", r.render()),
            Dst::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Content {
    Bytes(Vec<u8>),
    /// Compresses well: exercises the ratio limit.
    Zeros(u16),
}

impl Content {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Content::Bytes(b) => b.clone(),
            Content::Zeros(n) => vec![0; *n as usize * 16],
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Kind {
    File { content: Content, deflate: bool, mode: Option<u16> },
    Symlink(String),
    Directory,
}

#[derive(Arbitrary, Debug)]
struct Entry {
    name: Rel,
    kind: Kind,
}

#[derive(Arbitrary, Debug)]
enum HashMode {
    None,
    Right,
    Wrong,
}

#[derive(Arbitrary, Debug)]
struct Module {
    name: u8,
    dir: bool,
    src: Rel,
    dst: Dst,
    hash: HashMode,
    mode: Option<u16>,
    /// Entries created under a directory module's src, or at a file module's src.
    content: Vec<(Rel, Content)>,
    with_entry: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    version: (u8, u8, u8),
    modules: Vec<Module>,
    extra: Vec<Entry>,
    manifest_first: bool,
    manifest_deflate: bool,
    flips: Vec<(u16, u8)>,
    truncate: Option<u16>,
}

fuzz_target!(|input: Input| {
    let (bytes, written) = build(&input);
    let Some(read) = tope_updater_fuzz::open_and_check(&bytes, true) else { return };
    // An undamaged archive gives back exactly what was written.
    if input.flips.is_empty() && input.truncate.is_none() {
        for (entry, content) in &read {
            assert_eq!(Some(content), written.get(entry), "entry {entry:?} reads back different bytes");
        }
    }
});

fn opts(deflate: bool) -> SimpleFileOptions {
    let o = SimpleFileOptions::default();
    if deflate {
        o.compression_method(zip::CompressionMethod::Deflated).compression_level(Some(1))
    } else {
        o.compression_method(zip::CompressionMethod::Stored)
    }
}

/// The archive, and the content of every file entry the writer accepted.
fn build(input: &Input) -> (Vec<u8>, std::collections::BTreeMap<String, Vec<u8>>) {
    let mut written = std::collections::BTreeMap::new();
    let mut entries: Vec<(String, Vec<u8>, bool, Option<u16>)> = Vec::new();
    let mut modules = Vec::new();
    for m in input.modules.iter().take(6) {
        let src = m.src.render();
        let src = if m.dir { format!("{}/", src.trim_end_matches('/')) } else { src };
        let mut o = serde_json::Map::new();
        o.insert("name".into(), format!("m{}", m.name % 8).into());
        o.insert("dst".into(), m.dst.render().into());
        if let Some(mode) = m.mode {
            o.insert("mode".into(), format!("{:o}", mode & 0o7777).into());
        }
        if m.dir {
            let mut files = serde_json::Map::new();
            for (rel, c) in m.content.iter().take(4) {
                let rel = rel.render();
                let bytes = c.bytes();
                let h = match m.hash {
                    HashMode::Right => Some(Hash::of(&bytes)),
                    HashMode::Wrong => Some(Hash([7; 32])),
                    HashMode::None => None,
                };
                if let Some(h) = h {
                    files.insert(rel.clone(), h.to_hex().into());
                }
                entries.push((format!("{src}{rel}"), bytes, true, m.mode));
            }
            if !matches!(m.hash, HashMode::None) {
                o.insert("files".into(), files.into());
            }
        } else {
            let bytes = m.content.first().map(|(_, c)| c.bytes()).unwrap_or_default();
            match m.hash {
                HashMode::Right => drop(o.insert("blake3".into(), Hash::of(&bytes).to_hex().into())),
                HashMode::Wrong => drop(o.insert("blake3".into(), Hash([7; 32]).to_hex().into())),
                HashMode::None => {}
            }
            if m.with_entry {
                entries.push((src.clone(), bytes, m.mode.is_some(), m.mode));
            }
        }
        o.insert("src".into(), src.into());
        modules.push(serde_json::Value::Object(o));
    }
    let (a, b, c) = input.version;
    let manifest = serde_json::json!({ "version": format!("{a}.{b}.{c}"), "modules": modules });
    let manifest = serde_json::to_vec(&manifest).unwrap();

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    // A module may deploy manifest.json itself (its src names it), so it is recorded too.
    let write_manifest = |zip: &mut zip::ZipWriter<std::io::Cursor<Vec<u8>>>, written: &mut std::collections::BTreeMap<String, Vec<u8>>| {
        if zip.start_file("manifest.json", opts(input.manifest_deflate)).is_ok() {
            zip.write_all(&manifest).unwrap();
            written.insert("manifest.json".into(), manifest.clone());
        }
    };
    if input.manifest_first {
        write_manifest(&mut zip, &mut written);
    }
    for (name, bytes, deflate, mode) in &entries {
        let mut o = opts(*deflate);
        if let Some(mode) = mode {
            o = o.unix_permissions(*mode as u32 & 0o7777);
        }
        if zip.start_file(name.as_str(), o).is_ok() {
            zip.write_all(bytes).unwrap();
            written.insert(name.clone(), bytes.clone());
        }
    }
    for e in input.extra.iter().take(6) {
        let name = e.name.render();
        match &e.kind {
            Kind::File { content, deflate, mode } => {
                let mut o = opts(*deflate);
                if let Some(mode) = mode {
                    o = o.unix_permissions(*mode as u32);
                }
                if zip.start_file(name.as_str(), o).is_ok() {
                    zip.write_all(&content.bytes()).unwrap();
                    written.insert(name.clone(), content.bytes());
                }
            }
            Kind::Symlink(target) => drop(zip.add_symlink(name.as_str(), target.as_str(), opts(false))),
            Kind::Directory => drop(zip.add_directory(name.as_str(), opts(false))),
        }
    }
    if !input.manifest_first {
        write_manifest(&mut zip, &mut written);
    }
    let mut bytes = zip.finish().unwrap().into_inner();
    let len = bytes.len();
    for (at, x) in input.flips.iter().take(4) {
        if len > 0 {
            bytes[*at as usize % len] ^= x;
        }
    }
    if let Some(t) = input.truncate {
        bytes.truncate(t as usize);
    }
    (bytes, written)
}
