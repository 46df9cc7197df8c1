//! What the commands print: human text or one JSON document (`--json`).

use crate::config::{KeyOrigin, KeyOrigins};
use crate::driver::{self, Outcome, RecoverReport, TxReport};
use serde::Serialize;
use std::path::Path;

/// The rendered configuration with `# file` or `# default` after each key; an unset optional
/// key (absent from TOML) becomes a comment line in its table. Each line is parsed as TOML on
/// its own to learn its key, so quoting stays TOML's business.
pub fn annotate_config(toml_text: &str, origins: &KeyOrigins) -> String {
    fn single_path(t: &toml::Table) -> Option<Vec<String>> {
        let (k, v) = t.iter().next().filter(|_| t.len() == 1)?;
        let mut path = vec![k.clone()];
        if let Some(inner) = v.as_table().filter(|i| !i.is_empty()) {
            path.extend(single_path(inner)?);
        }
        Some(path)
    }
    let label = |o: &KeyOrigin| match o {
        KeyOrigin::File => "file",
        KeyOrigin::Default => "default",
    };
    let parent = |k: &str| k.rsplit_once('.').map_or(String::new(), |(p, _)| p.to_string());
    let mut shown = std::collections::BTreeSet::new();
    // The unset keys of `section`, before the blank lines that end it.
    let flush = |lines: &mut Vec<String>,
                 section: &str,
                 shown: &mut std::collections::BTreeSet<String>| {
        let unset: Vec<(&String, &KeyOrigin)> =
            origins.iter().filter(|(k, _)| parent(k) == section && !shown.contains(*k)).collect();
        let at = lines.len() - lines.iter().rev().take_while(|l| l.is_empty()).count();
        let comments = unset.iter().map(|(k, o)| {
            format!("# {}: unset  # {}", k.rsplit('.').next().unwrap_or(k), label(o))
        });
        lines.splice(at..at, comments.collect::<Vec<_>>());
        shown.extend(unset.into_iter().map(|(k, _)| k.clone()));
    };
    let mut section = String::new();
    let mut lines: Vec<String> = vec![];
    for line in toml_text.lines() {
        let path = toml::from_str::<toml::Table>(line).ok().as_ref().and_then(single_path);
        let name = match path {
            Some(path) if line.trim_start().starts_with('[') => {
                flush(&mut lines, &section, &mut shown);
                section = path.join(".");
                section.clone()
            }
            Some(path) if section.is_empty() => path.join("."),
            Some(path) => format!("{section}.{}", path.join(".")),
            None => String::new(),
        };
        // An empty table (`[services]` without services) is a setting of its own.
        match origins.get(&name) {
            Some(o) => {
                lines.push(format!("{line}  # {}", label(o)));
                shown.insert(name);
            }
            None => lines.push(line.to_string()),
        }
    }
    flush(&mut lines, &section, &mut shown);
    let rest: Vec<String> = origins
        .iter()
        .filter(|(k, _)| !shown.contains(*k))
        .map(|(k, o)| format!("# {k}: unset  # {}", label(o)))
        .collect();
    if !rest.is_empty() {
        lines.push(String::new());
        lines.extend(rest);
    }
    lines.join("\n")
}

pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            );
        } else {
            println!("{}", human());
        }
    }

    pub fn tx_report(&self, r: &TxReport) {
        self.emit(r, || render_tx(r));
        // A failed transaction is an error like any other: the stable code goes to stderr.
        if let Outcome::RolledBack { error, .. }
        | Outcome::RollbackFailed { error }
        | Outcome::Interrupted { error } = &r.outcome
        {
            eprintln!("error: {}: {}", error.code, error.message);
        }
    }

    pub fn recover(&self, r: &RecoverReport) {
        let failed = match r {
            RecoverReport::Finished { report, .. } => match &report.outcome {
                Outcome::RolledBack { error, .. }
                | Outcome::RollbackFailed { error }
                | Outcome::Interrupted { error } => Some(error),
                Outcome::Committed => None,
            },
            RecoverReport::NeedsOperator { error, .. } => error.as_ref(),
            RecoverReport::TrialExpired { report, .. } => match &report.outcome {
                Outcome::RolledBack { error, .. }
                | Outcome::RollbackFailed { error }
                | Outcome::Interrupted { error } => Some(error),
                Outcome::Committed => None,
            },
            RecoverReport::Nothing | RecoverReport::Trial { .. } => None,
        };
        if let Some(error) = failed {
            eprintln!("error: {}: {}", error.code, error.message);
        }
        self.emit(r, || match r {
            RecoverReport::Nothing => "recover: nothing in flight".into(),
            RecoverReport::NeedsOperator { tx, error } => format!(
                "recover: transaction {tx} NEEDS AN OPERATOR: {}\n  fix the cause, then run \
                `tope-updater recover --retry`",
                error.as_ref().map(std::string::ToString::to_string).unwrap_or_default()
            ),
            RecoverReport::Finished { report, journal_lost } => {
                let lost =
                    journal_lost.as_ref().map(|e| format!("recover: {e}\n")).unwrap_or_default();
                format!("{lost}recover: {}", render_tx(report))
            }
            RecoverReport::Trial { tx, version, boots, max_boots } => format!(
                "recover: nothing in flight; trial install of {version} (tx {tx}) not confirmed \
                yet: boot {boots} of {max_boots} (run `tope-updater confirm` to keep it)"
            ),
            RecoverReport::TrialExpired { version, boots, report } => format!(
                "recover: trial install of {version} was not confirmed in {} boot(s) after its \
                install: rolling it back\nrecover: {}",
                boots - 1,
                render_tx(report)
            ),
        });
    }

    pub fn status(&self, s: &driver::StatusReport) {
        self.emit(s, || {
            let mut o = String::new();
            match &s.current {
                Some(g) => {
                    o += &format!(
                        "current:     {} (generation {}, {} files)\n",
                        g.version, g.id, g.files
                    );
                }
                None => o += "current:     factory baseline (nothing installed)\n",
            }
            let kept: Vec<String> =
                s.generations.iter().map(|g| format!("{} (gen {})", g.version, g.id)).collect();
            o += &format!(
                "generations: {}\n",
                if kept.is_empty() { "none".into() } else { kept.join(", ") }
            );
            o += &format!("factory:     {} paths recorded\n", s.factory_paths);
            o += &format!(
                "backups:     {} blobs, {}\n",
                s.backups.blobs,
                human_bytes(s.backups.bytes)
            );
            match &s.in_flight {
                Some(f) => {
                    o += &format!(
                        "in flight:   tx {} {} -> {} in phase {}{}\n",
                        f.tx,
                        f.kind,
                        f.to_version.as_deref().unwrap_or("factory"),
                        f.phase,
                        f.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                    );
                }
                None => o += "in flight:   none\n",
            }
            if let Some(t) = &s.trial {
                o += &format!(
                    "trial:       {} (tx {}) awaits `tope-updater confirm`: boot {} of {}\n",
                    t.version, t.tx, t.boots, t.max_boots
                );
            }
            if let Some(l) = &s.last {
                o += &format!(
                    "last:        tx {} {} -> {}: {}{}",
                    l.id,
                    kind_of(l),
                    l.to_version.as_deref().unwrap_or("factory"),
                    l.phase,
                    l.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                );
            }
            o.trim_end().to_string()
        });
    }

    pub fn history(&self, h: &[crate::journal::records::TxRecord]) {
        self.emit(&h, || {
            if h.is_empty() {
                return "no transactions".into();
            }
            h.iter()
                .map(|r| {
                    format!(
                        "tx {:>4}  {:<8} {:>8} -> {:<8} {:<15} {} files, {} commits{}{}",
                        r.id,
                        kind_of(r),
                        r.from_version.as_deref().unwrap_or("factory"),
                        r.to_version.as_deref().unwrap_or("factory"),
                        r.phase.name(),
                        r.targets,
                        r.commits,
                        if r.freed_blobs > 0 {
                            format!(
                                ", freed {} blobs ({})",
                                r.freed_blobs,
                                human_bytes(r.freed_bytes)
                            )
                        } else {
                            String::new()
                        },
                        r.error.as_ref().map(|e| format!("  [{e}]")).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        });
    }

    pub fn verify(&self, r: &driver::VerifyReport) {
        self.emit(r, || {
            let head = format!(
                "verify: {} managed paths against {}",
                r.checked,
                r.version.as_deref().unwrap_or("the factory baseline")
            );
            if r.mismatches.is_empty() {
                format!("{head}: all match")
            } else {
                format!("{head}:\n  {}", r.mismatches.join("\n  "))
            }
        });
    }
}

fn kind_of(r: &crate::journal::records::TxRecord) -> crate::driver::TxAction {
    crate::driver::TxAction::of(&r.kind)
}

fn render_tx(r: &TxReport) -> String {
    let from = r.from_version.as_deref().unwrap_or("factory");
    let to = r.to_version.as_deref().unwrap_or("factory");
    match &r.outcome {
        Outcome::Committed => {
            format!(
                "{} {from} -> {to}: committed (tx {}, {} files, {} journal commits)",
                r.kind, r.tx, r.targets, r.commits
            )
        }
        Outcome::RolledBack { error, touched } => format!(
            "{} {from} -> {to}: FAILED and rolled back (tx {}): {error}{}",
            r.kind,
            r.tx,
            if *touched { "" } else { "; no target file was changed" }
        ),
        Outcome::RollbackFailed { error } => {
            format!(
                "{} {from} -> {to}: ROLLBACK FAILED (tx {}), an operator is needed: {error}",
                r.kind, r.tx
            )
        }
        Outcome::Interrupted { error } => format!(
            "{} {from} -> {to}: INTERRUPTED (tx {}), still in flight: fix the cause, then run \
            `tope-updater recover`: {error}",
            r.kind, r.tx
        ),
    }
}

/// For `demo`: a path relative to the demo root, for readable output.
pub fn short(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).map_or_else(|_| p.display().to_string(), |r| format!("/{}", r.display()))
}

/// `1.5 MiB`, `300 B`: sizes as people read them.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(super::human_bytes(300), "300 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(200 << 20), "200.0 MiB");
    }
}
