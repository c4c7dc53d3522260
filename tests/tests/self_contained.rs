//! The repository stands alone: no tracked file refers to a path outside it, so a clone from its
//! public home has everything its code, tests, scripts and documents name.
//!
//! Flagged, in every tracked text file (Cargo.lock aside):
//! - a relative path (`../…`) that climbs out of the repository from the file's own folder;
//! - the sibling folder `shared/` that once sat beside the repository, under any number of `../`;
//! - an absolute path to a sibling of this checkout (what sits beside it on this machine), or into
//!   the home directory.

use regex::Regex;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use tests::workspace_root;

/// The tracked files, from git (a clone always has it).
fn tracked_files(root: &Path) -> Vec<PathBuf> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z"])
        .output()
        .expect("git runs (this test reads the tracked files from git)");
    assert!(out.status.success(), "git ls-files: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(String::from_utf8_lossy(p).as_ref()))
        .collect()
}

/// `base/relative` with `.` and `..` resolved lexically; `None` once it climbs above `/`.
fn resolve(base: &Path, relative: &str) -> Option<PathBuf> {
    let mut out = base.to_path_buf();
    for part in Path::new(relative).components() {
        match part {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// Every reference to a path outside `root` in one file's text, as `path:line: what`.
fn outside_references(root: &Path, file: &Path, text: &str, absolute: &[String]) -> Vec<String> {
    // A run of `../` and what follows it, not inside a longer path (`a/../b` stays in its folder).
    let relative = Regex::new(r"(?:^|[^\w./])((?:\.\./)+[\w.\-/]*)").unwrap();
    let shared = Regex::new(concat!(r"(?:\.\./)+", "shared", r"\b")).unwrap();
    let folder = root.join(file.parent().unwrap_or(Path::new("")));
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |what: String| format!("{}:{}: {what}", file.display(), n + 1);
        for m in relative.captures_iter(line) {
            let path = &m[1];
            if !resolve(&folder, path).is_some_and(|p| p.starts_with(root)) {
                found.push(at(format!("`{path}` leaves the repository")));
            }
        }
        if let Some(m) = shared.find(line) {
            found.push(at(format!("`{}` is the folder beside the repository", m.as_str())));
        }
        for prefix in absolute {
            if line.contains(prefix.as_str()) {
                found.push(at(format!("`{prefix}` is a path of this machine")));
            }
        }
    }
    found
}

#[test]
fn no_tracked_file_refers_outside_the_repository() {
    let root = workspace_root();
    let mut absolute = Vec::new();
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from).filter(|h| h.parent().is_some()) {
        absolute.push(format!("{}/", home.display()));
    }
    // What sits beside the checkout, unless that is a folder every machine shares (`/`, the temp
    // folder), where other programs' files come and go.
    let parent = root.parent().expect("the checkout has a parent");
    if parent.parent().is_some() && parent != std::env::temp_dir() {
        for entry in std::fs::read_dir(parent).expect("the checkout's parent lists").flatten() {
            if entry.path() != root {
                absolute.push(entry.path().display().to_string());
            }
        }
    }
    let mut found = Vec::new();
    let files = tracked_files(&root);
    assert!(files.len() > 100, "git listed only {} tracked files", files.len());
    for file in files.iter().filter(|f| f.as_path() != Path::new("Cargo.lock")) {
        // Binary files (none is text) and files deleted but not yet committed are skipped.
        let Ok(text) = std::fs::read_to_string(root.join(file)) else { continue };
        found.extend(outside_references(&root, file, &text, &absolute));
    }
    assert!(found.is_empty(), "tracked files refer to paths outside the repository:\n{}", found.join("\n"));
}

#[test]
fn the_check_finds_each_kind_of_reference() {
    let root = Path::new("/home/me/repo");
    let absolute = vec!["/home/me/".to_string(), "/home/shared".to_string()];
    let check = |file: &str, text: &str| outside_references(root, Path::new(file), text, &absolute);
    // Built, not written out, so this file holds no such reference itself.
    let up = |n: usize| "../".repeat(n);
    // Out of the repository from the file's folder.
    assert_eq!(check("README.md", &format!("see {}notes.md", up(1))).len(), 1);
    assert_eq!(check("a/b/c.rs", &format!(r#"join("{}x")"#, up(3))).len(), 1);
    // The old sibling folder, even where the climb stays inside.
    assert_eq!(check("a/b/c.rs", &format!(r#"join("{}shared/golden")"#, up(2))).len(), 1);
    // An absolute path of this machine.
    assert_eq!(check("scripts/x.sh", "cp /home/me/models/m.gguf .").len(), 1);
    assert_eq!(check("docs/x.md", "see /home/shared/notes.md").len(), 1);
    // Inside the repository: nothing.
    assert!(check("docs/a.md", &format!("[readme]({}README.md)", up(1))).is_empty());
    assert!(check("engine/tests/x.rs", &format!(r#"join("{}tests/data/golden/g.json")"#, up(1))).is_empty());
    assert!(check("scripts/x.sh", r#"ln -s "$dir/../lib/x" y"#).is_empty());
    assert!(check("a/b.rs", "let shared = 1; // the shared/ folder of a crate").is_empty());
}
