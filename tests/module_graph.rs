//! No cycles between the top-level modules of `src/`.
//!
//! A module is `src/x.rs` or `src/x/`; an edge x → y is any `crate::y` path in
//! x's non-test code (grouped `use crate::{y::a, z}` forms included, and
//! `super::` paths that climb out of x's directory). Comments, string
//! literals and `#[cfg(test)]` items are ignored: tests may reach anywhere.
//!
//! The intended layering, bottom to top (a module uses only modules below it;
//! the same map is in `src/lib.rs`):
//!
//! ```text
//! units, codec, observe,  leaves: value types of the config format, line I/O,
//! action, mail            metrics, what a policy/auth hit does, the SMTP
//!                         transaction vocabulary (MAIL parameters, dot-stuffing)
//! transport               client streams and PROXY (codec, units)
//! sign                    DKIM signing: keys, decision, signature fields (uses none of these)
//! auth, backend           SPF/DKIM/DMARC/ARC; clients of the legacy servers,
//!                         with their capability types and the one caps cache
//! state                   the shared limiter store (Valkey/Redis): ops, keys, leases
//! policy                  limits, plus a policy block's auth settings (auth::AuthPolicy)
//! triage                  DNSBL scoring, pregreet, pass cache (auth's resolver, policy's LRU)
//! config                  YAML → the validated types the modules below own
//! tls                     server TLS for the configured listeners
//! conn                    the client-connection layer the protocols share
//! smtp, pop3, imap        the client-facing protocols (the edges: they count metrics)
//! server                  listeners, runtime snapshots, reload (an edge too)
//! demo                    the `demo` subcommand
//! ```
//!
//! Why this order: each domain module owns its validated types and config
//! only parses YAML into them, so config sits above policy, auth and backend,
//! and defaults (`config/defaults.rs`) are passed down as values. Policy is
//! above auth because a policy block carries the auth settings; the action
//! vocabulary both use is a leaf. Metrics are counted at the edges from the
//! facts the modules below return, so observe stays a leaf.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// (from, to) → files of `from` that make the edge.
type Graph = BTreeMap<(String, String), BTreeSet<String>>;

/// Removes comments, string/char literals and `#[cfg(test)]` items, keeping
/// line structure irrelevant (only paths matter).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &src[i..];
        if rest.starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if rest.starts_with("/*") {
            let mut depth = 0;
            while i < b.len() {
                if src[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if src[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(n) = raw_string_len(rest) {
            out.push_str("\"\"");
            i += n;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && char_literal_len(rest).is_some() {
            i += char_literal_len(rest).unwrap_or(1);
            out.push_str("' '");
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    drop_cfg_test(&out)
}

/// `r"…"`, `r#"…"#`, `br"…"`: the length of the literal, if one starts here.
fn raw_string_len(s: &str) -> Option<usize> {
    let start = if s.starts_with("br") {
        2
    } else if s.starts_with('r') {
        1
    } else {
        return None;
    };
    let hashes = s[start..].bytes().take_while(|b| *b == b'#').count();
    if s.as_bytes().get(start + hashes) != Some(&b'"') {
        return None;
    }
    let close = format!("\"{}", "#".repeat(hashes));
    let body = start + hashes + 1;
    s[body..].find(&close).map(|e| body + e + close.len())
}

/// `'x'`, `'\n'`, `'\u{..}'` (not a lifetime `'a`).
fn char_literal_len(s: &str) -> Option<usize> {
    let mut it = s.char_indices().skip(1);
    let (_, c) = it.next()?;
    if c == '\\' {
        let end = s[2..].find('\'')?;
        return Some(end + 3);
    }
    let (j, q) = it.next()?;
    (q == '\'').then_some(j + 1)
}

/// Removes each item after `#[cfg(test)]` (up to its `;` or its braced block).
fn drop_cfg_test(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let mut depth = 0usize;
        let mut end = item.len();
        for (i, c) in item.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules named by `crate::` paths in `code`, and by `super::`
/// paths that climb out of the module's directory from a file at `depth`
/// (0 = `src/x.rs` or `src/x/mod.rs`, 1 = `src/x/y.rs`, …). Inline `mod`
/// blocks are not followed: outside tests the crate has none that matter.
fn targets(code: &str, depth: usize) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let words = tokens(code);
    let word = |j: usize| words.get(j).copied();
    for k in 0..words.len() {
        let after_sep = k > 0 && words[k - 1] == "::";
        if words[k] == "crate" && word(k + 1) == Some("::") && !after_sep {
            collect_after(&words, k + 2, &mut found);
        } else if words[k] == "super" && !after_sep {
            let mut ups = 0;
            let mut j = k;
            while word(j) == Some("super") && word(j + 1) == Some("::") {
                ups += 1;
                j += 2;
            }
            if ups > depth {
                collect_after(&words, j, &mut found);
            }
        }
    }
    found
}

/// The first path segment(s) at `k`: one name, or every first segment of a
/// `{a::b, c, d::{e}}` group.
fn collect_after(words: &[&str], k: usize, found: &mut BTreeSet<String>) {
    match words.get(k).copied() {
        Some("{") => {
            let mut depth = 0;
            let mut expect = true;
            for w in &words[k..] {
                match *w {
                    "{" => {
                        depth += 1;
                        if depth == 1 {
                            expect = true;
                        }
                    }
                    "}" => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    "," if depth == 1 => expect = true,
                    w if depth == 1 && expect && w.chars().all(is_ident) => {
                        if w != "self" {
                            found.insert(w.to_string());
                        }
                        expect = false;
                    }
                    _ => {
                        if depth == 1 {
                            expect = false;
                        }
                    }
                }
            }
        }
        Some(w) if w.chars().all(is_ident) && !w.is_empty() => {
            found.insert(w.to_string());
        }
        _ => {}
    }
}

/// Identifiers, `::`, and single punctuation characters.
fn tokens(code: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if is_ident(c) {
            let s = i;
            while i < b.len() && is_ident(b[i] as char) {
                i += 1;
            }
            out.push(&code[s..i]);
        } else if code[i..].starts_with("::") {
            out.push("::");
            i += 2;
        } else if c.is_whitespace() || !c.is_ascii() {
            i += code[i..].chars().next().map_or(1, char::len_utf8);
        } else {
            out.push(&code[i..i + 1]);
            i += 1;
        }
    }
    out
}

/// Every `.rs` file under `src/` with its top-level module and depth.
fn sources(src: &Path) -> Vec<(PathBuf, String, usize)> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel: Vec<String> = p
                .strip_prefix(src)
                .unwrap()
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            let top = rel[0].trim_end_matches(".rs").to_string();
            // src/x.rs and src/x/mod.rs are the module root (depth 0);
            // src/x/y.rs is one level down
            let depth = match rel.last().map(String::as_str) {
                _ if rel.len() == 1 => 0,
                Some("mod.rs") => rel.len() - 2,
                _ => rel.len() - 1,
            };
            out.push((p, top, depth));
        }
    }
    out.sort();
    out
}

fn graph_of(files: &[(String, String, usize, String)], modules: &BTreeSet<String>) -> Graph {
    let mut g = Graph::new();
    for (name, top, depth, text) in files {
        if top == "lib" || top == "main" {
            continue;
        }
        for t in targets(&strip(text), *depth) {
            if &t != top && modules.contains(&t) {
                g.entry((top.clone(), t)).or_default().insert(name.clone());
            }
        }
    }
    g
}

/// The cycles to report: for every edge a → b that lies on a cycle, the
/// shortest way back from b to a, each cycle once (rotated to start at its
/// smallest module). Listing every elementary cycle would bury the reader
/// (a tangled graph has dozens); this names each offending edge at least once.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    let mut adj: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in g.keys() {
        adj.entry(a).or_default().push(b);
    }
    let mut found = BTreeSet::new();
    for (a, b) in g.keys() {
        // breadth-first from b to a
        let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([b.as_str()]);
        let mut seen = BTreeSet::from([b.as_str()]);
        while let Some(n) = queue.pop_front() {
            if n == a {
                break;
            }
            for &m in adj.get(n).map(Vec::as_slice).unwrap_or(&[]) {
                if seen.insert(m) {
                    prev.insert(m, n);
                    queue.push_back(m);
                }
            }
        }
        if !seen.contains(a.as_str()) {
            continue;
        }
        let mut back = vec![a.as_str()];
        while let Some(&p) = prev.get(back.last().unwrap()) {
            back.push(p);
        }
        // back = a, …, b (reversed path b → a); the cycle is a → b → … → a
        back.reverse();
        let mut cycle: Vec<String> = std::iter::once(a.as_str())
            .chain(back.into_iter().take_while(|n| n != a))
            .map(str::to_string)
            .collect();
        let min = (0..cycle.len()).min_by_key(|&i| &cycle[i]).unwrap_or(0);
        cycle.rotate_left(min);
        found.insert(cycle);
    }
    found.into_iter().collect()
}

fn describe(g: &Graph, cycle: &[String]) -> String {
    let mut s = cycle.join(" → ");
    s.push_str(&format!(" → {}\n", cycle[0]));
    for i in 0..cycle.len() {
        let (a, b) = (&cycle[i], &cycle[(i + 1) % cycle.len()]);
        let files: Vec<&str> = g[&(a.clone(), b.clone())]
            .iter()
            .map(String::as_str)
            .collect();
        s.push_str(&format!("    {a} → {b}: {}\n", files.join(", ")));
    }
    s
}

#[test]
fn no_cycles_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files: Vec<(String, String, usize, String)> = sources(&src)
        .into_iter()
        .map(|(p, top, depth)| {
            let text = std::fs::read_to_string(&p).expect("read source");
            let name = p
                .strip_prefix(src.parent().unwrap())
                .unwrap()
                .display()
                .to_string();
            (name, top, depth, text)
        })
        .collect();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| f.1.clone())
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let g = graph_of(&files, &modules);
    let edges: Vec<String> = g.keys().map(|(a, b)| format!("{a} → {b}")).collect();
    println!("module graph:\n  {}", edges.join("\n  "));
    let found = cycles(&g);
    let report: String = found.iter().map(|c| describe(&g, c)).collect();
    assert!(
        found.is_empty(),
        "{} cycle(s) between top-level modules:\n{report}",
        found.len()
    );
}

/// One synthetic file per module: (module, depth, source).
fn synthetic(files: &[(&str, usize, &str)]) -> Vec<Vec<String>> {
    let files: Vec<(String, String, usize, String)> = files
        .iter()
        .map(|(m, d, t)| (format!("src/{m}.rs"), m.to_string(), *d, t.to_string()))
        .collect();
    let modules = files.iter().map(|f| f.1.clone()).collect();
    cycles(&graph_of(&files, &modules))
}

#[test]
fn finds_a_two_way_edge_through_a_grouped_use() {
    let found = synthetic(&[
        ("a", 0, "use crate::{b::X, c};\n"),
        ("b", 1, "use crate::a::Y;\n"),
        ("c", 0, "fn f() {}\n"),
    ]);
    assert_eq!(found, vec![vec!["a".to_string(), "b".to_string()]]);
}

#[test]
fn finds_a_longer_cycle_and_super_paths_out_of_a_directory() {
    let found = synthetic(&[
        ("a", 1, "fn f() { crate::b::g() }\n"),
        ("b", 1, "use super::super::c::Z;\nuse super::local::W;\n"),
        ("c", 0, "pub use crate::{x::{self, y}, a::V};\n"),
        ("x", 0, "use super::y;\n"),
    ]);
    assert_eq!(
        found,
        vec![vec!["a".to_string(), "b".to_string(), "c".to_string()]]
    );
}

#[test]
fn test_code_comments_and_strings_are_ignored() {
    let found = synthetic(&[
        ("a", 0, "use crate::b::X;\n"),
        (
            "b",
            0,
            "// crate::a::x\n/* crate::a::y */\nconst S: &str = \"crate::a::z\";\nconst R: &str = r#\"crate::a::r\"#;\nfn f(c: char) -> bool { c == '{' }\n#[cfg(test)]\nmod tests {\n    use crate::a::Y;\n    fn g() { let _ = '}'; }\n}\n#[cfg(test)]\nuse crate::a::Z;\n",
        ),
    ]);
    assert!(found.is_empty(), "{found:?}");
}
