//! Which services a transaction controls, in which order, and which post commands it runs
//! (SPEC §4). Pure: the driver asks, then acts.

use super::plan::{ModulePlan, Plan};
use serde::{Deserialize, Serialize};

/// A service as a manifest named it (`process_name`) with its `restart_order`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRef {
    pub name: String,
    pub restart_order: Option<i64>,
}

/// The services a set of modules names, in start order: ascending `restart_order`, modules
/// without one after all numbered ones, ties in manifest order. A service named by several
/// modules appears once, with the lowest order any of them gives.
pub fn start_order(modules: &[ModulePlan]) -> Vec<ServiceRef> {
    let mut out: Vec<(ServiceRef, usize)> = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        let Some(name) = &m.process_name else { continue };
        match out.iter_mut().find(|(s, _)| s.name == *name) {
            Some((s, _)) => s.restart_order = lowest(s.restart_order, m.restart_order),
            None => {
                out.push((ServiceRef { name: name.clone(), restart_order: m.restart_order }, i));
            }
        }
    }
    out.sort_by_key(|(s, first)| (s.restart_order.is_none(), s.restart_order, *first));
    out.into_iter().map(|(s, _)| s).collect()
}

/// Stop order: the start order reversed.
pub fn stop_order(modules: &[ModulePlan]) -> Vec<ServiceRef> {
    let mut v = start_order(modules);
    v.reverse();
    v
}

fn lowest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// One post command of the plan, with its position in the plan's flat list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostCommand<'a> {
    pub index: u32,
    pub module: &'a str,
    pub command: &'a str,
}

/// Every post command of the plan, module by module in manifest order.
pub fn post_commands(plan: &Plan) -> Vec<PostCommand<'_>> {
    plan.modules
        .iter()
        .flat_map(|m| m.post_cmds.iter().map(move |c| (m.name.as_str(), c.as_str())))
        .enumerate()
        .map(|(i, (module, command))| PostCommand { index: i as u32, module, command })
        .collect()
}

/// The post commands still to run after `done` of them completed (a power cut re-runs only
/// the unfinished ones).
pub fn remaining_post_commands(plan: &Plan, done: u32) -> Vec<PostCommand<'_>> {
    post_commands(plan).into_iter().filter(|c| c.index >= done).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, service: Option<&str>, order: Option<i64>, cmds: &[&str]) -> ModulePlan {
        ModulePlan {
            name: name.into(),
            process_name: service.map(str::to_string),
            restart_order: order,
            post_cmds: cmds.iter().map(std::string::ToString::to_string).collect(),
        }
    }

    fn names(v: &[ServiceRef]) -> Vec<&str> {
        v.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn starts_ascending_and_stops_descending() {
        let mods = [
            module("c", Some("svc-c"), Some(3), &[]),
            module("a", Some("svc-a"), Some(1), &[]),
            module("b", Some("svc-b"), Some(2), &[]),
        ];
        assert_eq!(names(&start_order(&mods)), ["svc-a", "svc-b", "svc-c"]);
        assert_eq!(names(&stop_order(&mods)), ["svc-c", "svc-b", "svc-a"]);
    }

    #[test]
    fn unordered_services_come_last_in_manifest_order_and_modules_without_service_are_ignored() {
        let mods = [
            module("x", Some("late-1"), None, &[]),
            module("plain", None, Some(0), &[]),
            module("y", Some("late-2"), None, &[]),
            module("z", Some("early"), Some(-5), &[]),
        ];
        assert_eq!(names(&start_order(&mods)), ["early", "late-1", "late-2"]);
    }

    #[test]
    fn a_service_named_twice_appears_once_with_its_lowest_order() {
        let mods = [
            module("bin", Some("api"), Some(9), &[]),
            module("other", Some("gui"), Some(5), &[]),
            module("cfg", Some("api"), Some(1), &[]),
        ];
        let s = start_order(&mods);
        assert_eq!(names(&s), ["api", "gui"]);
        assert_eq!(s[0].restart_order, Some(1));
    }

    #[test]
    fn post_commands_are_flat_in_module_order_and_resume_after_the_done_ones() {
        let plan = Plan {
            tx_id: 1,
            kind: super::super::TxKind::Rollback { to: super::super::RollbackTarget::Factory },
            from_version: None,
            to_version: None,
            modules: vec![
                module("a", None, Some(2), &["one", "two"]),
                module("b", None, Some(1), &["three"]),
            ],
            targets: Vec::new(),
            created_dirs: Vec::new(),
            removed_dirs: Vec::new(),
            controls_services: false,
            runs_post_cmds: true,
        };
        let all: Vec<&str> = post_commands(&plan).iter().map(|c| c.command).collect();
        assert_eq!(all, ["one", "two", "three"]);
        let rest: Vec<(u32, &str)> =
            remaining_post_commands(&plan, 1).iter().map(|c| (c.index, c.command)).collect();
        assert_eq!(rest, [(1, "two"), (2, "three")]);
        assert!(remaining_post_commands(&plan, 3).is_empty());
    }
}
