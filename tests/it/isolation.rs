//! One table-driven walk over every operation of the OpenAPI document: each
//! authenticated operation is tried with no key, an unknown key and every key
//! of a wrong role; each partner operation on a resource is tried with
//! another partner's key. The table is the document itself, so a route added
//! to it is covered without touching this test.

use std::collections::BTreeMap;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::*;

/// One operation of the document, with its path parameters filled in.
struct Op {
    method: Method,
    template: String,
    role: String,
}

fn operations(doc: &Value) -> Vec<Op> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (m, op) in item.as_object().expect("path item") {
            let Ok(method) = m.to_uppercase().parse::<Method>() else {
                continue;
            };
            if !matches!(
                method,
                Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE
            ) {
                continue;
            }
            if let Some(role) = op["x-role"].as_str() {
                ops.push(Op {
                    method,
                    template: path.clone(),
                    role: role.to_string(),
                });
            }
        }
    }
    ops
}

/// Fills `{name}` placeholders from `ids`; an unknown name is a test defect.
fn fill(template: &str, ids: &BTreeMap<&str, String>) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').expect("closing brace") + start;
        out.push_str(&rest[..start]);
        let name = &rest[start + 1..end];
        out.push_str(
            ids.get(name)
                .unwrap_or_else(|| panic!("no value for path parameter {{{name}}} of {template}")),
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_wrong_roles_and_other_partners() {
    let app = spawn_app().await;
    let (s, doc) = app.request(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let ops = operations(&doc);
    assert!(
        ops.len() >= 30,
        "the document lists only {} authenticated operations",
        ops.len()
    );

    // Partner A owns a claim with an offline invitation and an export;
    // partner B is the stranger.
    let a = app.create_partner(json!({})).await;
    let b = app.create_partner(json!({"name": "Stranger Co"})).await;
    let upstream = app.upstream_key().await;
    let prereg = app
        .claimed(&a, "iso-walk@customer.example", "+8613600000077")
        .await;
    let link = app.offline_link(&a, prereg).await;
    let invitation = link["invitation_id"].as_str().unwrap().to_string();
    let (s, export) = app.post("/v1/exports", &a.key, json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{export}");
    let export = export["id"].as_str().unwrap().to_string();

    let keys: BTreeMap<&str, String> = [
        ("partner", a.key.clone()),
        ("upstream", upstream.clone()),
        ("operator", OPERATOR.to_string()),
    ]
    .into();
    // Path parameters: A's resources where the route is A's, valid values
    // elsewhere (authorisation must come first, whatever the id names).
    let ids: BTreeMap<&str, String> = [
        ("id", prereg.to_string()),
        ("account_id", "acct-iso".to_string()),
        ("queue", "registration".to_string()),
        ("year", "2026".to_string()),
    ]
    .into();

    let mut checked = 0;
    for op in &ops {
        // Resource ids by route family, so another partner's key meets A's
        // invitation and export, not a random id.
        let mut ids = ids.clone();
        if op.template.starts_with("/v1/invitations/") {
            ids.insert("id", invitation.clone());
        } else if op.template.starts_with("/v1/exports/") {
            ids.insert("id", export.clone());
        } else if op.template.starts_with("/v1/admin/partners/") {
            ids.insert("id", a.id.to_string());
        } else if op.role != "partner" {
            ids.insert("id", Uuid::new_v4().to_string());
        }
        let mut path = fill(&op.template, &ids);
        if op.template == "/v1/invitations/preview" {
            path.push_str(&format!("?preregistration_id={prereg}"));
        }
        let body =
            matches!(op.method, Method::POST | Method::PUT | Method::PATCH).then(|| json!({}));
        let what = format!("{} {}", op.method, op.template);

        let (s, v) = app
            .request(op.method.clone(), &path, None, body.clone())
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what} without a key: {v}");
        assert_eq!(v["error"]["code"], "unauthorized", "{what}: {v}");
        let (s, v) = app
            .request(
                op.method.clone(),
                &path,
                Some("prereg_pk_0000000000000000000000000000000000000000"),
                body.clone(),
            )
            .await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{what} with an unknown key: {v}"
        );

        for (role, key) in &keys {
            if *role == op.role {
                continue;
            }
            let (s, v) = app
                .request(op.method.clone(), &path, Some(key), body.clone())
                .await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{what} with a {role} key: {v}");
            assert_eq!(v["error"]["code"], "wrong_role", "{what}: {v}");
        }

        // Another partner's key on a partner route that names A's resource.
        if op.role == "partner"
            && (op.template.contains('{') || op.template == "/v1/invitations/preview")
        {
            let body = match op.template.as_str() {
                "/v1/preregistrations/{id}/review" => Some(json!({"justification": "mine"})),
                _ => body.clone(),
            };
            let (s, v) = app
                .request(op.method.clone(), &path, Some(&b.key), body)
                .await;
            assert_eq!(
                s,
                StatusCode::NOT_FOUND,
                "{what} with another partner's key: {v}"
            );
            assert_eq!(v["error"]["code"], "not_found", "{what}: {v}");
        }
        checked += 1;
    }
    assert_eq!(checked, ops.len());

    // Batch routes name A's claim in their body: each item is not found.
    for (path, field) in [
        ("/v1/preregistrations/batch-delete", "ids"),
        ("/v1/invitations", "preregistration_ids"),
        ("/v1/invitations/resend", "preregistration_ids"),
    ] {
        let (s, v) = app.post(path, &b.key, json!({ field: [prereg] })).await;
        assert!(s.is_success(), "{path}: {s} {v}");
        let item = &v["results"][0];
        assert_eq!(item["error"]["code"], "not_found", "{path}: {v}");
    }
    // Lists and history of the stranger show nothing of A's.
    for path in ["/v1/preregistrations", "/v1/history"] {
        let (s, v) = app.get(path, &b.key).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        assert_eq!(v["items"].as_array().unwrap().len(), 0, "{path}: {v}");
    }

    // Nothing the stranger or the wrong roles sent changed A's claim.
    let (s, mine) = app
        .get(&format!("/v1/preregistrations/{prereg}"), &a.key)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(mine["status"], "invited", "{mine}");
    let (_, inv) = app
        .get(&format!("/v1/invitations/{invitation}"), &a.key)
        .await;
    assert_ne!(inv["status"], "superseded", "{inv}");
    app.cleanup().await;
}
