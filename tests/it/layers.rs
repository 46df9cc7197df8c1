//! The module layers of `src/` (ARCHITECTURE.md, "Layers"): which top-level module refers to
//! which (`crate::X` paths outside the unit tests, comment lines skipped), and that this graph
//! has no cycle, so every module imports only downward.
//! `cargo test --test it layers -- --nocapture` prints the graph, one layer per line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The top-level modules each `crate::` path in `text` names (`crate::a::b`, and each item of
/// `crate::{a, b::c}`).
fn referenced_modules(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| {
        s.chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect::<String>()
    };
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or("");
                found.extend(
                    group.split(',').map(|item| ident(item.trim())).filter(|m| !m.is_empty()),
                );
            } else {
                let m = ident(rest);
                if !m.is_empty() {
                    found.insert(m);
                }
            }
        }
    }
    found
}

/// Every top-level module of `src/` and the others it refers to (its unit tests excluded:
/// test helpers may reach anywhere).
fn module_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_str()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let refs: Vec<String> =
                referenced_modules(code).into_iter().filter(|m| *m != top).collect();
            graph.entry(top).or_default().extend(refs);
        }
    }
    graph
}

/// A cycle of the graph as the path that closes it (`a -> b -> a`), if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in g.get(node).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

/// Layer 0 are the modules that refer to no other; each module sits one above the highest it
/// refers to.
fn layers(graph: &Graph) -> BTreeMap<usize, Vec<String>> {
    fn depth(g: &Graph, n: &str, memo: &mut BTreeMap<String, usize>) -> usize {
        if let Some(d) = memo.get(n) {
            return *d;
        }
        let d = g.get(n).into_iter().flatten().map(|m| depth(g, m, memo) + 1).max().unwrap_or(0);
        memo.insert(n.to_string(), d);
        d
    }
    let mut memo = BTreeMap::new();
    let mut by_layer: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for n in graph.keys() {
        by_layer.entry(depth(graph, n, &mut memo)).or_default().push(n.clone());
    }
    by_layer
}

#[test]
fn the_modules_of_src_form_layers_without_a_cycle() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The scan sees the code: the modules are there, and references known to exist are found.
    assert!(graph.len() >= 30, "{graph:?}");
    assert!(graph["driver"].contains("engine") && graph["daemon"].contains("driver"), "{graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("a module cycle: {} (every edge: {graph:#?})", cycle.join(" -> "));
    }
    for (layer, modules) in layers(&graph) {
        println!("layer {layer}: {}", modules.join(", "));
    }
    for (m, refs) in &graph {
        println!("{m} -> {}", refs.iter().cloned().collect::<Vec<_>>().join(", "));
    }
}

#[test]
fn the_scan_reads_grouped_paths_skips_comments_and_finds_a_loop() {
    let refs = referenced_modules(
        "use crate::{journal::Journal, error};\n\
         // crate::daemon\n\
         let x = crate::clock::now_unix_ms();",
    );
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["clock", "error", "journal"]);
    let graph: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")].into_iter().fold(
        Graph::new(),
        |mut g, (from, to)| {
            g.entry(from.into()).or_default().insert(to.into());
            g
        },
    );
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let mut acyclic = graph.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&acyclic), None);
    assert_eq!(layers(&acyclic)[&2], ["a"]);
}
