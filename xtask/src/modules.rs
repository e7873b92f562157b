//! The dependency rule of `tracer` (ARCHITECTURE.md): no cycle among its
//! top-level modules. Every `crate::` path counts, in `use` items and in
//! code (`crate::model::Captured::from_headers(..)`), and `super::` paths
//! are resolved from the file's place; test code (`#[cfg(test)]`) does not
//! count. The sources are parsed with `syn`.
//!
//! Why not cargo-modules: its graph has the `use` items only, so a cycle
//! closed by a path written in code goes unseen (on this crate it missed
//! report → ike and bundle → render), and it takes ten minutes of CPU to
//! install.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use syn::visit::Visit;

/// One edge, with where it was first seen (for the message).
type Edges = BTreeMap<(String, String), String>;

/// Fails, naming the modules and one use per edge, if the top-level
/// modules of the crate rooted at `src` depend on each other in a cycle.
pub fn check_acyclic(src: &Path) -> anyhow::Result<()> {
    let edges = edges(src)?;
    let cycles = cycles(&edges);
    if cycles.is_empty() {
        return Ok(());
    }
    let mut message = String::new();
    for cycle in &cycles {
        message.push_str(&format!("\n  cycle among {}:", cycle.join(", ")));
        for ((from, to), at) in &edges {
            if cycle.contains(from) && cycle.contains(to) {
                message.push_str(&format!("\n    {from} -> {to} ({at})"));
            }
        }
    }
    bail!(
        "modules of {} depend on each other in a cycle (see ARCHITECTURE.md, the dependency rule):{message}",
        src.display()
    )
}

/// Every dependency between two top-level modules of the crate at `src`.
pub fn edges(src: &Path) -> anyhow::Result<Edges> {
    let mut files = Vec::new();
    for file in rust_files(src)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let parsed =
            syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        files.push((file, parsed));
    }
    let files = without_test_modules(files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|(f, _)| module_path(f.strip_prefix(src).ok()?).first().cloned())
        .collect();
    let mut edges = Edges::new();
    for (file, parsed) in &files {
        let relative = file.strip_prefix(src).unwrap_or(file);
        let module = module_path(relative);
        // The crate roots: what they import is not a module's dependency.
        let Some(top) = module.first().cloned() else {
            continue;
        };
        let mut paths = Paths {
            module: &module,
            found: Vec::new(),
        };
        paths.visit_file(parsed);
        for (target, line) in paths.found {
            // `super::item` at the root names an item, not a module.
            if target != top && modules.contains(&target) {
                edges
                    .entry((top.clone(), target))
                    .or_insert_with(|| format!("{}:{line}", relative.display()));
            }
        }
    }
    Ok(edges)
}

/// Leaves out the files of modules declared under `#[cfg(test)]`
/// (`#[cfg(test)] mod tests;` → `tests.rs` or `tests/mod.rs` beside it).
fn without_test_modules(files: Vec<(PathBuf, syn::File)>) -> Vec<(PathBuf, syn::File)> {
    let mut test_only: BTreeSet<PathBuf> = BTreeSet::new();
    for (file, parsed) in &files {
        let stem = file.file_stem().unwrap_or_default();
        // Children of `a/mod.rs`, `lib.rs` live beside it; of `a.rs`, in `a/`.
        let dir = match file.parent() {
            Some(parent) if matches!(stem.to_str(), Some("mod" | "lib" | "main")) => {
                parent.to_path_buf()
            }
            Some(parent) => parent.join(stem),
            None => continue,
        };
        for item in &parsed.items {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
                && is_test_only(&m.attrs)
            {
                test_only.insert(dir.join(format!("{}.rs", m.ident)));
                test_only.insert(dir.join(m.ident.to_string()).join("mod.rs"));
            }
        }
    }
    files
        .into_iter()
        .filter(|(f, _)| !test_only.contains(f))
        .collect()
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// `trace/assemble.rs` → [trace, assemble]; `trace/mod.rs` → [trace];
/// `lib.rs` → [].
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if !matches!(stem, "mod" | "lib" | "main") {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// The top-level modules a file's paths name, with their lines.
struct Paths<'a> {
    module: &'a [String],
    found: Vec<(String, usize)>,
}

impl Paths<'_> {
    /// The top-level module `segments` (a path's leading identifiers) lead
    /// to, if it starts at `crate` or `super`.
    fn resolve(&self, segments: &[String]) -> Option<String> {
        let mut here: Vec<&str> = self.module.iter().map(String::as_str).collect();
        let mut rest = segments.iter();
        match rest.next()?.as_str() {
            "crate" => here.clear(),
            "super" => {
                here.pop();
                for segment in rest.by_ref() {
                    if segment != "super" {
                        here.push(segment);
                        break;
                    }
                    here.pop();
                }
            }
            _ => return None,
        }
        here.first()
            .map(|m| (*m).to_string())
            .or_else(|| rest.next().cloned())
    }

    fn add(&mut self, segments: &[String], line: usize) {
        if let Some(target) = self.resolve(segments) {
            self.found.push((target, line));
        }
    }
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// Every path a use tree spells out (`crate::{a, b::c}` → `crate::a`, `crate::b::c`).
fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push([prefix.clone(), vec![n.ident.to_string()]].concat()),
        syn::UseTree::Rename(r) => out.push([prefix.clone(), vec![r.ident.to_string()]].concat()),
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for tree in &g.items {
                use_paths(tree, prefix, out);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Impl(i) => &i.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_test_only(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        let mut paths = Vec::new();
        use_paths(&item.tree, &mut Vec::new(), &mut paths);
        let line = item.use_token.span.start().line;
        for path in paths {
            self.add(&path, line);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        let line = path
            .segments
            .first()
            .map_or(0, |s| s.ident.span().start().line);
        self.add(&segments, line);
        syn::visit::visit_path(self, path);
    }
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(edges: &Edges) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        graph.entry(from).or_default().push(to);
        graph.entry(to).or_default();
    }
    struct State<'g> {
        graph: &'g BTreeMap<&'g str, Vec<&'g str>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn connect<'g>(s: &mut State<'g>, v: &'g str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in &s.graph[v] {
            if !s.index.contains_key(w) {
                connect(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for &v in graph.keys() {
        if !state.index.contains_key(v) {
            connect(&mut state, v);
        }
    }
    state.found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_with(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "xtask-modules-{}-{}",
            std::process::id(),
            files.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn a_cycle_through_a_path_in_code_and_super_is_found() {
        let src = crate_with(&[
            ("lib.rs", "pub mod a; pub mod b; pub mod c;"),
            (
                "a/mod.rs",
                "mod inner; use crate::b::Thing; #[cfg(test)] mod tests;",
            ),
            ("a/tests.rs", "use crate::d::h;"),
            ("d.rs", "pub fn h() {}"),
            // super::super from a/inner.rs is the crate root: c.
            ("a/inner.rs", "fn f() { super::super::c::g(); }"),
            (
                "b.rs",
                "pub struct Thing; fn f() -> crate::a::X { todo!() }",
            ),
            (
                "c.rs",
                "pub fn g() {} #[cfg(test)] mod tests { use crate::a::X; }",
            ),
        ]);
        let edges = edges(&src).unwrap();
        let pairs: Vec<(&str, &str)> = edges
            .keys()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(pairs, vec![("a", "b"), ("a", "c"), ("b", "a")]);
        let error = format!("{:#}", check_acyclic(&src).unwrap_err());
        assert!(error.contains("cycle among a, b"), "{error}");
        assert!(error.contains("b -> a (b.rs:1)"), "{error}");
        std::fs::remove_dir_all(&src).unwrap();
    }

    /// The rule itself, on the real crate.
    #[test]
    fn tracer_has_no_module_cycle() {
        check_acyclic(&crate::util::workspace_root().join("tracer/src")).unwrap();
    }
}
