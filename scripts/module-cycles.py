#!/usr/bin/env python3
"""Finds circles among the modules of a Rust crate.

Usage: scripts/module-cycles.py CRATE_SRC [CRATE_SRC ...]   (e.g. router/src engine/src)

Every non-test source file is a module. A module depends on another when its code names a path
into it: `crate::a::b::Item`, `super::x`, `self::child::y` or a child module by name, in `use`
trees and in expressions alike. A path is charged to the deepest module it reaches, so naming
`crate::pd::Finish` depends on `pd` (or on `pd/finish.rs` if `Finish` lives there). A re-export
(`pub use`) is an alias, not a dependency, unless the module uses the item itself: a path through
it is charged to the module that defines the item. Declaring a child (`mod x;`) is not a dependency; using what a child defines is. Test modules (files named
`tests.rs`, `*_tests.rs`, `testutil.rs`, or under a `tests/` folder) and `main.rs` are left out:
they sit on top of everything and may name anything.

Prints each circle (strongly connected component of more than one module) with the edges that
close it, and exits 1 if there is any.
"""

import re
import sys
from pathlib import Path

TEST_FILE = re.compile(r"(^|_)tests\.rs$|^testutil\.rs$")
MOD_DECL = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", re.M)
PATH_ATTR = re.compile(r"#\[path\s*=")
USE_STMT = re.compile(r"(\bpub(?:\([^)]*\))?\s+)?\buse\s+([^;]+);", re.S)
EXPR_PATH = re.compile(r"\b((?:crate|super|self)(?:\s*::\s*[A-Za-z_][A-Za-z0-9_]*)+)")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    # String literals may hold `crate::` in messages; drop their contents.
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def strip_cfg_test_blocks(text):
    """Removes `#[cfg(test)] mod x { ... }` inline blocks (their paths are test code)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        out.append(text[i:m.start()])
        i = j
    out.append(text[i:])
    return "".join(out)


def expand_use_tree(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e] (as lists of segments)."""
    tree = re.sub(r"\s+as\s+(\w+)", r"@\1", tree)
    tree = re.sub(r"\s+", "", tree)

    def parse(s, prefix):
        paths, depth, start = [], 0, 0
        parts = []
        for k, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(s[start:k])
                start = k + 1
        parts.append(s[start:])
        for part in parts:
            if not part:
                continue
            brace = part.find("{")
            if brace == -1:
                paths.append(prefix + [p for p in part.split("::") if p])
            else:
                head = [p for p in part[:brace].split("::") if p]
                paths.extend(parse(part[brace + 1:part.rindex("}")], prefix + head))
        return paths

    return parse(tree, [])


class Crate:
    def __init__(self, src):
        self.src = Path(src)
        self.files = {}  # module path (tuple) -> file
        self.children = {}  # module path -> set of child names
        root = self.src / "lib.rs"
        if not root.exists():
            root = self.src / "main.rs"
        self.walk((), root)

    def walk(self, modpath, file):
        self.files[modpath] = file
        text = strip_comments(file.read_text())
        names = set()
        for m in MOD_DECL.finditer(text):
            name = m.group(1)
            before = text[max(0, m.start() - 200):m.start()]
            last_attr = before.rstrip().rsplit("\n", 1)[-1]
            if PATH_ATTR.search(last_attr):
                continue  # a #[path] module: tests reached sideways
            child = self.child_file(modpath, file, name)
            if child is None:
                continue
            names.add(name)
            if self.is_test(child) or "cfg(test)" in last_attr:
                continue
            self.walk(modpath + (name,), child)
        self.children[modpath] = names

    def child_file(self, modpath, file, name):
        base = file.parent if file.name in ("lib.rs", "main.rs", "mod.rs") else file.with_suffix("")
        for cand in (base / f"{name}.rs", base / name / "mod.rs"):
            if cand.exists():
                return cand
        return None

    def is_test(self, file):
        rel = file.relative_to(self.src)
        return bool(TEST_FILE.search(file.name)) or "tests" in rel.parts[:-1] or file.name == "main.rs"

    def resolve(self, here, segs, depth=0):
        """The deepest module that the path `segs`, written in module `here`, reaches."""
        if not segs:
            return None
        if segs[0] == "crate":
            cur, rest = (), segs[1:]
        elif segs[0] in ("super", "self"):
            cur, rest = here, segs
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    cur = cur[:-1]
                rest = rest[1:]
        elif segs[0] in self.children.get(here, ()):
            cur, rest = here, segs
        else:
            return None  # an external crate or a local item
        for k, seg in enumerate(rest):
            if cur + (seg,) in self.files:
                cur = cur + (seg,)
                continue
            alias = self.reexports.get(cur, {}).get(seg)
            if alias is not None and depth < 8:
                via, path = alias
                return self.resolve(via, path + rest[k + 1:], depth + 1)
            break
        return cur

    def texts(self):
        for mod, file in self.files.items():
            yield mod, strip_cfg_test_blocks(strip_comments(file.read_text()))

    def find_reexports(self):
        """Each module's `pub use` names: name -> (module written in, path)."""
        self.reexports = {}
        for mod, text in self.texts():
            names = {}
            for m in USE_STMT.finditer(text):
                if not m.group(1):
                    continue
                for segs in expand_use_tree(m.group(2)):
                    last = segs[-1]
                    name = last.split("@")[-1]
                    path = segs[:-1] + [last.split("@")[0]]
                    if name not in ("*", "self"):
                        names[name] = (mod, path)
            self.reexports[mod] = names

    def edges(self):
        self.find_reexports()
        graph = {m: set() for m in self.files}
        for mod, text in self.texts():
            paths = []
            body = MOD_DECL.sub("", USE_STMT.sub("", text))
            for m in USE_STMT.finditer(text):
                for p in expand_use_tree(m.group(2)):
                    segs = [s.split("@")[0] for s in p]
                    # A re-export the module also uses itself is a dependency too.
                    if not m.group(1) or re.search(rf"\b{re.escape(p[-1].split('@')[-1])}\b", body):
                        paths.append(segs)
            for m in EXPR_PATH.finditer(body):
                paths.append(re.sub(r"\s+", "", m.group(1)).split("::"))
            for segs in paths:
                target = self.resolve(mod, segs)
                if target is None or target == mod:
                    continue
                graph[mod].add(target)
        return graph


def circles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def name(mod):
    return "crate::" + "::".join(mod) if mod else "crate"


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    found = False
    for src in argv[1:]:
        crate = Crate(src)
        graph = crate.edges()
        comps = circles(graph)
        print(f"{src}: {len(crate.files)} modules, {len(comps)} circle(s)")
        for comp in comps:
            found = True
            members = set(comp)
            print(f"  circle of {len(comp)}: {', '.join(name(m) for m in comp)}")
            for m in comp:
                for t in sorted(graph[m] & members):
                    print(f"    {name(m)} -> {name(t)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
