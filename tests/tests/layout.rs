//! The tree keeps the shape a newcomer can follow: no module of any crate imports, through
//! others, a module that imports it (an import cycle), and no source file outside the tests is
//! longer than 1,000 lines unless its header says why.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// A module's path in its crate, `["api", "http", "handlers"]`.
type ModPath = Vec<String>;

const MAX_LINES: usize = 1_000;
/// What a file's header says to be allowed more lines.
const LONG_REASON: &str = "Longer than 1,000 lines because";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

/// Every crate's `src/` directory, from the workspace members' manifests.
fn crate_sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() && !name.starts_with('.') && name != "target" {
                stack.push(path);
            } else if name == "Cargo.toml" && dir.join("src").is_dir() {
                out.push(dir.join("src"));
            }
        }
    }
    out.sort();
    out
}

/// The `.rs` files below `dir`, binaries' own directory and test modules left out.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "bin" {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" {
                out.push(path);
            }
        }
    }
    out
}

fn module_path(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModPath = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file without its test module and its comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths a `use` tree or path expression names from `text` on: `a::b`, `a::{b, c::d}`.
fn paths_at(text: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        let ident: String = rest.chars().take_while(|c| is_ident(*c)).collect();
        if !ident.is_empty() {
            rest = &rest[ident.len()..];
            prefix.push(ident);
            match rest.strip_prefix("::") {
                Some(after) => rest = after,
                None => return vec![prefix],
            }
        } else if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            let inner = &group[..end];
            // Split the group at its top-level commas.
            let (mut depth, mut start, mut out) = (0, 0, Vec::new());
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(&inner[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            out.push(&inner[start..]);
            return out
                .into_iter()
                .flat_map(|part| paths_at(part.trim()))
                .map(|p| prefix.iter().cloned().chain(p).collect())
                .collect();
        } else {
            return vec![prefix];
        }
    }
}

/// The modules of its crate that a module refers to through `crate::` and `super::` paths.
fn references(module: &ModPath, code: &str) -> Vec<ModPath> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == ':' || c == '$') {
            continue;
        }
        out.extend(paths_at(&code[at + "crate::".len()..]));
    }
    for (at, _) in code.match_indices("super::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let mut base = module.clone();
        base.pop();
        let mut rest = &code[at + "super::".len()..];
        while let Some(after) = rest.strip_prefix("super::") {
            base.pop();
            rest = after;
        }
        out.extend(
            paths_at(rest)
                .into_iter()
                .map(|p| base.iter().cloned().chain(p).collect()),
        );
    }
    out
}

/// Tarjan's strongly connected components with more than one module: the import cycles.
fn cycles(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct State<'a> {
        graph: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        next: usize,
        out: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a ModPath) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        for w in s.graph.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[w].min(s.low[v]);
                s.low.insert(v, low);
            } else if s.stack.contains(&w) {
                let low = s.index[w].min(s.low[v]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.out
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let mut found = Vec::new();
    let sources = crate_sources();
    assert!(
        sources.len() >= 10,
        "only {} crates found: {sources:?}",
        sources.len()
    );
    for src in sources {
        let files: BTreeMap<ModPath, String> = rust_files(&src)
            .into_iter()
            .map(|f| {
                (
                    module_path(&src, &f),
                    code(&fs::read_to_string(&f).unwrap()),
                )
            })
            .collect();
        let mut graph: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
        for (module, code) in &files {
            let edges = graph.entry(module.clone()).or_default();
            for path in references(module, code) {
                // The longest prefix of the path that is a module is what it refers to.
                let target = (1..=path.len())
                    .rev()
                    .map(|k| path[..k].to_vec())
                    .find(|p| files.contains_key(p));
                // A module's own ancestors hold it; referring to them is no cycle.
                if let Some(target) = target.filter(|t| !module.starts_with(t)) {
                    edges.insert(target);
                }
            }
        }
        for cycle in cycles(&graph) {
            let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
            found.push(format!("{}: {}", src.display(), names.join(" ⇄ ")));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_cycle_finder_sees_a_cycle_through_a_use_group() {
    let a: ModPath = vec!["a".into()];
    let b: ModPath = vec!["b".into()];
    let refs = references(&a, "use crate::{b::{Thing, other}, c};");
    assert!(refs.contains(&vec!["b".to_string(), "Thing".to_string()]));
    assert!(refs.contains(&vec!["c".to_string()]));
    let graph = BTreeMap::from([
        (a.clone(), BTreeSet::from([b.clone()])),
        (b.clone(), BTreeSet::from([a.clone()])),
    ]);
    assert_eq!(cycles(&graph).len(), 1);
}

#[test]
fn no_source_file_outside_the_tests_is_over_1000_lines_without_a_reason() {
    let mut long = Vec::new();
    for src in crate_sources() {
        if src.starts_with(root().join("tests")) {
            continue;
        }
        for file in rust_files(&src) {
            let text = fs::read_to_string(&file).unwrap();
            let lines = match text.find("#[cfg(test)]\nmod tests {") {
                Some(at) => text[..at].lines().count(),
                None => text.lines().count(),
            };
            let header: String = text.lines().take(12).collect::<Vec<_>>().join("\n");
            if lines > MAX_LINES && !header.contains(LONG_REASON) {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines without \"{LONG_REASON}\" in the header:\n{}",
        long.join("\n")
    );
}
