//! Keeps `openapi.json` in step with the router: every routed path (and
//! method) is documented, and every documented one is routed.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

const ROUTER_SOURCE: &str = include_str!("mod.rs");
const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "head", "options"];

/// Every `.route("<path>", <method router>)` call in `src`: the path and the
/// HTTP methods of its method router.
fn routed(src: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut rest = src;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let args = rest.trim_start();
        let Some(args) = args.strip_prefix('"') else {
            panic!(
                "a .route( call whose first argument is not a string literal: {}",
                &rest[..rest.len().min(80)]
            );
        };
        let end = args.find('"').expect("an unterminated path literal");
        let path = args[..end].to_string();
        let methods = methods_of(call_args(&args[end + 1..]));
        out.entry(path).or_default().extend(methods);
    }
    out
}

/// The text of the rest of a call's arguments, up to its closing parenthesis.
fn call_args(s: &str) -> &str {
    let mut depth = 0usize;
    let mut in_str = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_str = !in_str,
            _ if in_str => {}
            '(' => depth += 1,
            ')' if depth == 0 => return &s[..i],
            ')' => depth -= 1,
            _ => {}
        }
    }
    s
}

/// The HTTP methods named as calls (`get(`, `.post(`, `routing::put(`) in `s`.
fn methods_of(s: &str) -> BTreeSet<String> {
    let bytes = s.as_bytes();
    let mut found = BTreeSet::new();
    for m in METHODS {
        let call = format!("{m}(");
        let mut from = 0;
        while let Some(i) = s[from..].find(&call) {
            let at = from + i;
            let word_start =
                at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            if word_start {
                found.insert(m.to_string());
            }
            from = at + call.len();
        }
    }
    found
}

fn document() -> Value {
    serde_json::from_str(super::health::OPENAPI).expect("openapi.json is not valid JSON")
}

/// Every documented path and its operations' methods.
fn documented(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let paths = doc["paths"]
        .as_object()
        .expect("openapi.json has no `paths` object");
    paths
        .iter()
        .map(|(path, item)| {
            let item = item.as_object().expect("a path item is not an object");
            let methods = item
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

#[test]
fn is_openapi_3() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi` is not a string");
    assert!(version.starts_with("3."), "openapi is {version:?}, not 3.x");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
}

#[test]
fn extracts_routes() {
    let src = r#"
        Router::new()
            .route("/a", get(h::a))
            .route(
                "/b/{id}",
                post(h::b).get(h::get_b).delete(h::c),
            )
            .route("/c", axum::routing::put(h::put_c))
    "#;
    let r = routed(src);
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(r.len(), 3);
    assert_eq!(r["/a"], names(&["get"]));
    assert_eq!(r["/b/{id}"], names(&["delete", "get", "post"]));
    assert_eq!(r["/c"], names(&["put"]));
}

#[test]
fn documents_exactly_the_routes() {
    let routes = routed(ROUTER_SOURCE);
    assert!(
        routes.contains_key("/openapi.json"),
        "found no routes in mod.rs"
    );
    let docs = documented(&document());

    let undocumented: Vec<&String> = routes.keys().filter(|p| !docs.contains_key(*p)).collect();
    assert!(
        undocumented.is_empty(),
        "routed but not in openapi.json: {undocumented:?}"
    );
    let unrouted: Vec<&String> = docs.keys().filter(|p| !routes.contains_key(*p)).collect();
    assert!(
        unrouted.is_empty(),
        "in openapi.json but not routed: {unrouted:?}"
    );

    for (path, methods) in &routes {
        assert_eq!(
            &docs[path], methods,
            "methods of {path}: openapi.json (left) vs router (right)"
        );
    }
}

#[test]
fn references_resolve() {
    fn walk(v: &Value, doc: &Value, missing: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    let pointer = r.strip_prefix('#').unwrap_or(r);
                    if doc.pointer(pointer).is_none() {
                        missing.push(r.clone());
                    }
                }
                map.values().for_each(|x| walk(x, doc, missing));
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, doc, missing)),
            _ => {}
        }
    }
    let doc = document();
    let mut missing = Vec::new();
    walk(&doc, &doc, &mut missing);
    assert!(missing.is_empty(), "unresolved $refs: {missing:?}");
}
