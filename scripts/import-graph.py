#!/usr/bin/env python3
"""Module import graph of the prereg library: which file imports which.

Prints the import circles (strongly connected components of more than one
file), the edges from src/api/ into workers/, and the SQL calls outside
src/store/. Used to check the architecture's one-way dependencies:
edges (api, cli, workers) -> flows -> store / mq / domain.

    python3 scripts/import-graph.py [REPO_DIR]
"""
import os, re, sys
from collections import defaultdict

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
os.chdir(root)

def files():
    for top in ("src", "workers"):
        for d, _, fs in os.walk(top):
            for f in fs:
                if f.endswith(".rs"):
                    yield os.path.join(d, f)

def modpath(path):
    # src/a/b.rs -> a::b ; src/a/mod.rs -> a ; workers/x.rs -> workers::x
    p = path[:-3].split(os.sep)
    if p[0] == "src":
        p = p[1:]
    if p[-1] in ("mod", "lib", "main"):
        p = p[:-1]
    return "::".join(p)

mods = {modpath(f): f for f in files()}

def resolve(path_parts):
    # longest prefix that is a module
    for i in range(len(path_parts), 0, -1):
        m = "::".join(path_parts[:i])
        if m in mods:
            return m
    return None

graph = defaultdict(set)
use_re = re.compile(r"\b(crate|super)((?:::\w+)+)")
brace_re = re.compile(r"\buse\s+(crate|super)((?:::\w+)*)::\{([^;]*)\};", re.S)
for m, f in mods.items():
    src = open(f).read()
    # drop #[cfg(test)] modules roughly: cut at "#[cfg(test)]\nmod tests"
    cut = src.find("#[cfg(test)]\nmod tests")
    if cut >= 0:
        src = src[:cut]
    # Comments (doc links included) are not dependencies.
    src = re.sub(r"//[^\n]*", "", src)
    here = m.split("::") if m else []
    is_dir_mod = f.endswith("mod.rs")
    def base(kind):
        if kind == "crate":
            return []
        parent = here if is_dir_mod else here[:-1]
        return parent[:-1] if False else parent
    refs = []
    for kind, rest in use_re.findall(src):
        refs.append(base(kind) + [x for x in rest.split("::") if x])
    for kind, pre, inner in brace_re.findall(src):
        prefix = base(kind) + [x for x in pre.split("::") if x]
        for item in re.split(r",", re.sub(r"\{[^}]*\}", "", inner)):
            item = item.strip().split(" as ")[0]
            if item and item != "self":
                refs.append(prefix + item.split("::"))
        for sub, subinner in re.findall(r"(\w+)::\{([^}]*)\}", inner):
            for item in subinner.split(","):
                item = item.strip()
                if item and item != "self":
                    refs.append(prefix + [sub] + item.split("::"))
    # A module depends on the submodules it declares (`mod x;`).
    for child in re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", src, re.M):
        refs.append(here + [child])
    for r in refs:
        t = resolve(r)
        if t is not None and t != m and not m.startswith(t + "::") and t != "":
            graph[m].add(t)

# Tarjan SCC
index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
def strong(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in graph[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        c = []
        while True:
            w = stack.pop(); on.discard(w); c.append(w)
            if w == v: break
        if len(c) > 1: sccs.append(sorted(c))
sys.setrecursionlimit(10000)
for v in list(mods):
    if v not in index:
        strong(v)

api_workers = sorted((a, b) for a in graph for b in graph[a] if a.startswith("api") and b.startswith("workers"))
sql = [f for f in mods.values() if not f.startswith("src/store/")
       for _ in re.findall(r"sqlx::query", open(f).read())]
print(f"import circles: {len(sccs)}")
for c in sccs:
    print("  " + " <-> ".join(c))
print(f"api -> workers imports: {len(api_workers)}")
for a, b in api_workers:
    print(f"  {a} -> {b}")
print(f"sqlx::query calls outside src/store/: {len(sql)}")
