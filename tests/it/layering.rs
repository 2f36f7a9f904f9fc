//! The module dependency order written in ARCHITECTURE.md ("Dependency order") is the order of the code: every
//! `crate::` path in `src/` (binaries excepted) must name a module its own module is allowed to use. A tidy
//! test in the style of rust-analyzer's: the document is the single source of the rules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Rules = BTreeMap<String, BTreeSet<String>>;

/// The rules table between `<!-- layering:begin -->` and `<!-- layering:end -->`: `| \`module\` | \`a\`, \`b\` |`.
fn parse_rules(doc: &str) -> Rules {
    let start = doc
        .find("<!-- layering:begin -->")
        .expect("layering table start marker");
    let end = doc
        .find("<!-- layering:end -->")
        .expect("layering table end marker");
    let mut rules = Rules::new();
    for line in doc[start..end].lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        let names = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        if let [m] = names(cells[0]).as_slice() {
            let allowed = cells.get(1).map(|c| names(c)).unwrap_or_default();
            rules.insert(m.clone(), allowed.into_iter().collect());
        }
    }
    rules
}

/// Strips `//` comments (doc comments mention modules freely) and string literals' contents.
fn code_only(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a source file names through `crate::x` or `crate::{x, y::z}`.
fn crate_paths(src: &str) -> BTreeSet<String> {
    let code = code_only(src);
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let ident_before = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !ident_before {
            if let Some(group) = after.strip_prefix('{') {
                out.extend(group_heads(group));
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
        rest = after;
    }
    out
}

/// The first segment of each item of a `{a, b::c, d::{e, f}}` group (the text after the opening brace).
fn group_heads(group: &str) -> Vec<String> {
    let (mut depth, mut item, mut heads) = (0usize, String::new(), Vec::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => heads.push(std::mem::take(&mut item)),
            _ => {}
        }
        if c != ',' || depth > 0 {
            item.push(c);
        }
    }
    heads.push(item);
    heads
        .iter()
        .filter_map(|h| {
            let name: String = h
                .trim_start_matches(|c: char| c.is_whitespace() || c == '{' || c == '}')
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Violations: (module, file, used module) for every edge the rules do not allow, and every module without
/// a rule.
fn check(files: &[(String, String)], rules: &Rules) -> Vec<String> {
    let mut problems = Vec::new();
    for (rel, text) in files {
        let module = rel.split('/').next().unwrap().trim_end_matches(".rs");
        if module == "bin" || module == "lib" {
            continue;
        }
        let Some(allowed) = rules.get(module) else {
            problems.push(format!(
                "src/{rel}: module `{module}` has no row in the dependency order"
            ));
            continue;
        };
        for used in crate_paths(text) {
            if used != module && !allowed.contains(&used) {
                problems.push(format!(
                    "src/{rel}: `{module}` uses `{used}`, which the order does not allow"
                ));
            }
        }
    }
    problems
}

fn sources(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, base, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, std::fs::read_to_string(&p).unwrap()));
        }
    }
}

#[test]
fn src_follows_the_documented_dependency_order() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = parse_rules(&std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap());
    assert!(rules.len() >= 10, "too few rules parsed: {rules:?}");
    let mut files = Vec::new();
    sources(&root.join("src"), &root.join("src"), &mut files);
    let problems = check(&files, &rules);
    assert!(
        problems.is_empty(),
        "dependency order violated:\n{}",
        problems.join("\n")
    );
    // Every rule names real modules, so a renamed module cannot leave a stale, permissive row behind.
    let modules: BTreeSet<String> = files
        .iter()
        .map(|(rel, _)| {
            rel.split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    for (m, allowed) in &rules {
        for name in std::iter::once(m).chain(allowed) {
            assert!(
                modules.contains(name),
                "ARCHITECTURE.md names `{name}`, which src/ does not have"
            );
        }
    }
}

#[test]
fn the_checker_catches_forbidden_edges_in_every_spelling() {
    let doc = "<!-- layering:begin -->\n| module | may use |\n|---|---|\n| `util` | |\n| `model` | `util` |\n\
               | `data` | `model`, `util` |\n<!-- layering:end -->";
    let rules = parse_rules(doc);
    assert_eq!(
        rules["data"],
        BTreeSet::from(["model".to_string(), "util".to_string()])
    );
    let ok = [
        (
            "data/a.rs",
            "use crate::model::Llava;\nuse crate::{util::fsx, model};",
        ),
        (
            "model/x.rs",
            "// uses crate::data in a comment only\nuse crate::util::prng;",
        ),
    ];
    let files: Vec<(String, String)> = ok
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(check(&files, &rules), Vec::<String>::new());
    for (rel, text) in [
        ("model/llava.rs", "use crate::data::collate::Batch;"),
        ("model/llama.rs", "fn f() { let x = crate::data::IGNORE; }"),
        (
            "model/mod.rs",
            "use crate::{\n    util::fsx,\n    data::{collate, pipeline},\n};",
        ),
        ("util.rs", "pub use crate::model;"),
    ] {
        let got = check(&[(rel.to_string(), text.to_string())], &rules);
        assert_eq!(got.len(), 1, "{rel}: {got:?}");
        assert!(got[0].contains("which the order does not allow"), "{got:?}");
    }
    let got = check(&[("newmod.rs".to_string(), String::new())], &rules);
    assert!(got[0].contains("has no row"), "{got:?}");
}
