//! Generations: what every managed path holds after each committed transaction, and the
//! factory baseline (each path's state before the first transaction that touched it).

use super::plan::{FileMeta, Hash, ModulePlan, PathState, Plan};
use super::services::ServiceRef;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A committed state of the device. Cumulative: it lists every path any kept transaction
/// deployed, so rolling back to it needs only it and the factory baseline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub id: u64,
    pub version: String,
    pub tx_id: u64,
    /// The generation that was current when this one was installed (`None`: the factory
    /// baseline). `rollback --to previous` returns to it.
    pub parent: Option<u64>,
    pub files: BTreeMap<String, FileMeta>,
    /// Directories created by transactions up to this one (absent in the factory baseline).
    pub dirs: BTreeSet<String>,
    /// Path → the service its module named (record version 2): a rollback that changes the
    /// path stops and starts that service.
    pub services: BTreeMap<String, ServiceRef>,
}

/// Path → state before the first transaction that touched it.
pub type Factory = BTreeMap<String, PathState>;

/// The state `path` must have to match `generation` (`None` = the factory baseline).
pub fn desired_state(path: &str, generation: Option<&Generation>, factory: &Factory) -> PathState {
    generation
        .and_then(|g| g.files.get(path))
        .map(|m| PathState::File(*m))
        .or_else(|| factory.get(path).copied())
        .unwrap_or(PathState::Absent)
}

/// The generation an install plan produces on top of `previous`. Every new hash must be
/// known (the driver calls this only after staging).
pub fn after_install(
    previous: Option<&Generation>,
    id: u64,
    plan: &Plan,
    version: &str,
) -> Option<Generation> {
    let mut files = previous.map(|g| g.files.clone()).unwrap_or_default();
    let mut dirs = previous.map(|g| g.dirs.clone()).unwrap_or_default();
    let mut services = previous.map(|g| g.services.clone()).unwrap_or_default();
    for t in &plan.targets {
        let owner = plan.modules.get(t.module as usize).and_then(|m| {
            m.process_name
                .as_ref()
                .map(|name| ServiceRef { name: name.clone(), restart_order: m.restart_order })
        });
        match owner {
            Some(s) => services.insert(t.path.clone(), s),
            None => services.remove(&t.path),
        };
        match t.new.settled()? {
            PathState::File(m) => {
                files.insert(t.path.clone(), m);
            }
            PathState::Absent => {
                files.remove(&t.path);
            }
        }
    }
    dirs.extend(plan.created_dirs.iter().cloned());
    Some(Generation {
        id,
        version: version.to_string(),
        tx_id: plan.tx_id,
        parent: previous.map(|g| g.id),
        files,
        dirs,
        services,
    })
}

/// The modules of a rollback plan: module 0 owns paths without a service; then one module per
/// service that owns a changed path in the generation left (`current`) or the one returned
/// to (`target`). Returns the modules and, for each path, its module index.
pub fn rollback_modules(
    paths: &[&str],
    current: Option<&Generation>,
    target: Option<&Generation>,
) -> (Vec<ModulePlan>, Vec<u32>) {
    let mut modules = vec![ModulePlan {
        name: "rollback".into(),
        process_name: None,
        restart_order: None,
        post_cmds: Vec::new(),
    }];
    let mut index = Vec::with_capacity(paths.len());
    for path in paths {
        let owners = [current, target].into_iter().flatten().filter_map(|g| g.services.get(*path));
        let mut first = 0;
        for s in owners {
            let i = if let Some(i) =
                modules.iter().position(|m| m.process_name.as_deref() == Some(s.name.as_str()))
            {
                i
            } else {
                modules.push(ModulePlan {
                    name: s.name.clone(),
                    process_name: Some(s.name.clone()),
                    restart_order: s.restart_order,
                    post_cmds: Vec::new(),
                });
                modules.len() - 1
            };
            if first == 0 {
                first = i;
            }
        }
        index.push(first as u32);
    }
    (modules, index)
}

/// Paths an install touches for the first time, with their state before it.
pub fn factory_additions(factory: &Factory, plan: &Plan) -> Vec<(String, PathState)> {
    plan.targets
        .iter()
        .filter(|t| !factory.contains_key(&t.path))
        .map(|t| (t.path.clone(), t.old))
        .collect()
}

/// Every path whose state is recorded anywhere: a rollback considers all of them.
pub fn managed_paths<'a>(
    current: Option<&'a Generation>,
    factory: &'a Factory,
) -> BTreeSet<&'a str> {
    let mut paths: BTreeSet<&str> = factory.keys().map(String::as_str).collect();
    if let Some(g) = current {
        paths.extend(g.files.keys().map(String::as_str));
    }
    paths
}

/// Directories to remove (when empty) when going from `current` back to `target`, deepest
/// first.
pub fn dirs_to_remove(current: Option<&Generation>, target: Option<&Generation>) -> Vec<String> {
    let empty = BTreeSet::new();
    let now = current.map_or(&empty, |g| &g.dirs);
    let keep = target.map_or(&empty, |g| &g.dirs);
    let mut out: Vec<String> = now.difference(keep).cloned().collect();
    // Longer paths first: a child is always longer than its parent.
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out
}

/// Blobs that kept generations and the factory baseline may need for a rollback.
pub fn referenced_blobs<'a>(
    generations: impl IntoIterator<Item = &'a Generation>,
    factory: &Factory,
) -> BTreeSet<Hash> {
    let mut out: BTreeSet<Hash> = factory.values().filter_map(PathState::hash).collect();
    for g in generations {
        out.extend(g.files.values().map(|m| m.hash));
    }
    out
}

/// The blobs needed once a commit has applied its generation changes: those of the kept
/// generations (less `removed`, plus `added`) and of the factory baseline (plus its
/// `additions`). What a collection may remove right after that commit is everything else.
pub fn referenced_after(
    generations: &[Generation],
    removed: &[u64],
    added: Option<&Generation>,
    factory: &Factory,
    additions: &[(String, PathState)],
) -> BTreeSet<Hash> {
    let kept = generations.iter().filter(|g| !removed.contains(&g.id)).chain(added);
    let mut out = referenced_blobs(kept, factory);
    out.extend(additions.iter().filter_map(|(_, s)| s.hash()));
    out
}

/// Ids of the generations to drop so that at most `keep` remain, oldest first. `ids` is
/// ascending.
pub fn prune(ids: &[u64], keep: usize) -> Vec<u64> {
    ids.iter().take(ids.len().saturating_sub(keep)).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::{ModulePlan, NewFile, NewState, PackageRef, Source, Target, TxKind};

    fn meta(h: u8) -> FileMeta {
        FileMeta { hash: Hash([h; 32]), size: 1, mode: 0o644, uid: 0, gid: 0 }
    }

    fn plan(targets: &[(&str, PathState, u8)], dirs: &[&str]) -> Plan {
        Plan {
            tx_id: 7,
            kind: TxKind::Install {
                package: PackageRef { path: "p.zip".into(), blake3: Hash([0; 32]), size: 0 },
            },
            from_version: None,
            to_version: Some("1.0.0".into()),
            modules: vec![],
            targets: targets
                .iter()
                .map(|(p, old, h)| Target {
                    path: p.to_string(),
                    module: 0,
                    old: *old,
                    new: NewState::File(NewFile {
                        hash: Some(Hash([*h; 32])),
                        size: 1,
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                    }),
                    source: Source::Package { entry: p.to_string() },
                })
                .collect(),
            created_dirs: dirs.iter().map(std::string::ToString::to_string).collect(),
            removed_dirs: vec![],
            controls_services: false,
            runs_post_cmds: false,
        }
    }

    #[test]
    fn generations_accumulate_files_and_dirs() {
        let g1 =
            after_install(None, 1, &plan(&[("/r/a", PathState::Absent, 1)], &["/r/d"]), "1.0.0")
                .unwrap();
        let g2 =
            after_install(Some(&g1), 2, &plan(&[("/r/b", PathState::Absent, 2)], &[]), "2.0.0")
                .unwrap();
        assert_eq!(g2.files.len(), 2);
        assert!(g2.dirs.contains("/r/d"));
    }

    #[test]
    fn desired_state_falls_back_to_factory_then_absent() {
        let mut factory = Factory::new();
        factory.insert("/r/a".into(), PathState::File(meta(9)));
        factory.insert("/r/b".into(), PathState::Absent);
        let g =
            after_install(None, 1, &plan(&[("/r/b", PathState::Absent, 2)], &[]), "1.0.0").unwrap();
        assert_eq!(desired_state("/r/a", Some(&g), &factory), PathState::File(meta(9)));
        assert_eq!(desired_state("/r/b", Some(&g), &factory), PathState::File(meta(2)));
        assert_eq!(desired_state("/r/b", None, &factory), PathState::Absent);
        assert_eq!(desired_state("/r/zzz", None, &factory), PathState::Absent);
    }

    #[test]
    fn factory_records_only_first_touch() {
        let mut factory = Factory::new();
        factory.insert("/r/a".into(), PathState::File(meta(9)));
        let p = plan(&[("/r/a", PathState::File(meta(5)), 1), ("/r/b", PathState::Absent, 2)], &[]);
        assert_eq!(factory_additions(&factory, &p), vec![("/r/b".to_string(), PathState::Absent)]);
    }

    #[test]
    fn removable_dirs_are_deepest_first() {
        let g = Generation {
            id: 1,
            version: "1.0.0".into(),
            tx_id: 1,
            parent: None,
            files: BTreeMap::new(),
            dirs: ["/r/a", "/r/a/b/c", "/r/a/b"]
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            services: BTreeMap::new(),
        };
        assert_eq!(dirs_to_remove(Some(&g), None), vec!["/r/a/b/c", "/r/a/b", "/r/a"]);
    }

    #[test]
    fn generations_remember_which_service_owns_each_path_and_rollbacks_control_them() {
        let mut p1 =
            plan(&[("/r/api", PathState::Absent, 1), ("/r/cfg", PathState::Absent, 2)], &[]);
        p1.modules = vec![
            ModulePlan {
                name: "api".into(),
                process_name: Some("device-api".into()),
                restart_order: Some(2),
                post_cmds: vec![],
            },
            ModulePlan {
                name: "cfg".into(),
                process_name: None,
                restart_order: None,
                post_cmds: vec![],
            },
        ];
        p1.targets[1].module = 1;
        let g1 = after_install(None, 1, &p1, "1.0.0").unwrap();
        assert_eq!(g1.services.get("/r/api").map(|s| s.name.as_str()), Some("device-api"));
        assert!(!g1.services.contains_key("/r/cfg"));
        // v2 moves /r/cfg under the gui service.
        let mut p2 = plan(&[("/r/cfg", PathState::File(meta(2)), 3)], &[]);
        p2.modules = vec![ModulePlan {
            name: "gui".into(),
            process_name: Some("gui".into()),
            restart_order: Some(1),
            post_cmds: vec![],
        }];
        let g2 = after_install(Some(&g1), 2, &p2, "2.0.0").unwrap();
        assert_eq!(g2.services.get("/r/cfg").map(|s| s.name.as_str()), Some("gui"));
        assert_eq!(g2.services.get("/r/api").map(|s| s.name.as_str()), Some("device-api"));
        // Rolling back only /r/cfg controls gui (owner now) but not device-api.
        let (mods, idx) = rollback_modules(&["/r/cfg"], Some(&g2), Some(&g1));
        let names: Vec<_> = mods.iter().filter_map(|m| m.process_name.as_deref()).collect();
        assert_eq!(names, ["gui"]);
        assert_eq!(idx, [1]);
        let (mods, idx) = rollback_modules(&["/r/api", "/r/cfg", "/r/other"], Some(&g2), None);
        assert_eq!(
            mods.iter().filter_map(|m| m.process_name.as_deref()).collect::<Vec<_>>(),
            ["device-api", "gui"]
        );
        assert_eq!(idx, [1, 2, 0]);
    }

    #[test]
    fn referenced_after_a_commit_drops_pruned_generations_and_keeps_new_and_factory() {
        let g = |id: u64, h: u8| Generation {
            id,
            version: format!("{id}.0.0"),
            tx_id: id,
            parent: None,
            files: [("/a".to_string(), meta(h))].into(),
            dirs: BTreeSet::default(),
            services: BTreeMap::default(),
        };
        let factory: Factory = [("/a".to_string(), PathState::File(meta(9)))].into();
        let gens = [g(1, 1), g(2, 2)];
        let new = g(3, 3);
        let additions = [("/b".to_string(), PathState::File(meta(8)))];
        let keep = referenced_after(&gens, &[1], Some(&new), &factory, &additions);
        let want: BTreeSet<Hash> = [2u8, 3, 8, 9].iter().map(|h| Hash([*h; 32])).collect();
        assert_eq!(keep, want, "generation 1 is pruned: its blob goes; the rest stays");
    }

    #[test]
    fn prune_keeps_the_newest() {
        assert_eq!(prune(&[1, 2, 3, 4, 5], 3), vec![1, 2]);
        assert!(prune(&[1, 2], 3).is_empty());
    }
}
