//! SPEC §8: weak secrets are refused outside development mode, and operator
//! keys issued with `prereg admin operator-key` are stored hashed and act as
//! the operator role.

use std::process::{Command, Output};

use reqwest::StatusCode;

use crate::common::*;

const STRONG_LINK: &str = "cli-link-secret-0a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// Runs the `prereg` binary with only `vars` in its environment, in an
/// empty directory (so no `.env` file is read).
fn prereg(vars: &[(&str, &str)], args: &[&str]) -> Output {
    let dir = std::env::temp_dir().join(format!("prereg-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prereg"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars.iter().copied())
        .current_dir(&dir)
        .output()
        .expect("prereg runs");
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The variables that point the binary at `app`'s database and broker prefix.
fn db_env(app: &TestApp) -> [(&'static str, &str); 3] {
    [
        ("PREREG_DATABASE_URL", app.cfg.database_url.as_str()),
        ("PREREG_AMQP_PREFIX", app.cfg.amqp_prefix.as_str()),
        // As the app declared its queues (see `TEST_QUEUES_EXPIRE`).
        ("PREREG_AMQP_QUEUE_EXPIRES", "15m"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_secrets_stop_the_process_naming_the_variable() {
    let app = spawn_app().await;
    let base = db_env(&app);
    let run = |extra: &[(&'static str, &str)]| {
        let mut vars: Vec<(&str, &str)> = base.to_vec();
        vars.extend_from_slice(extra);
        prereg(&vars, &["admin", "operator-key", "list"])
    };
    for (extra, var) in [
        (
            vec![("PREREG_LINK_SECRET", STRONG_LINK)],
            "PREREG_OPERATOR_TOKEN",
        ),
        (
            vec![
                ("PREREG_OPERATOR_TOKEN", "dev-operator-token"),
                ("PREREG_LINK_SECRET", STRONG_LINK),
            ],
            "PREREG_OPERATOR_TOKEN",
        ),
        (
            vec![("PREREG_OPERATOR_TOKEN", OPERATOR)],
            "PREREG_LINK_SECRET",
        ),
        (
            vec![
                ("PREREG_OPERATOR_TOKEN", OPERATOR),
                ("PREREG_LINK_SECRET", "short-secret"),
            ],
            "PREREG_LINK_SECRET",
        ),
    ] {
        let out = run(&extra);
        assert!(!out.status.success(), "started with {extra:?}");
        assert!(text(&out).contains(var), "{extra:?}: {}", text(&out));
    }
    // Development mode accepts them; proper secrets are accepted anywhere.
    let out = run(&[("PREREG_DEV_MODE", "1")]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&[
        ("PREREG_OPERATOR_TOKEN", OPERATOR),
        ("PREREG_LINK_SECRET", STRONG_LINK),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_keys_are_issued_listed_revoked_and_stored_hashed() {
    let app = spawn_app().await;
    let mut vars = db_env(&app).to_vec();
    vars.extend([
        ("PREREG_OPERATOR_TOKEN", OPERATOR),
        ("PREREG_LINK_SECRET", STRONG_LINK),
    ]);
    let issue = |label: &str| {
        let out = prereg(&vars, &["admin", "operator-key", "issue", "--label", label]);
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_string()
        };
        (field("key_id "), field("api_key "))
    };
    let (id1, key1) = issue("alice");
    let (id2, key2) = issue("bob");

    // The key authenticates the operator role (and only that role).
    let (s, v) = app.get("/v1/admin/reviews", &key1).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = app.get("/v1/partner", &key1).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Stored as a hash only.
    let stored: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE role = 'operator'")
            .fetch_all(app.db())
            .await
            .unwrap();
    assert_eq!(stored.len(), 2);
    for h in &stored {
        assert_eq!(h.len(), 32);
        assert!(!String::from_utf8_lossy(h).contains(&key1));
    }

    let out = prereg(&vars, &["admin", "operator-key", "list"]);
    let listed = text(&out);
    assert!(listed.contains(&id1) && listed.contains("alice") && listed.contains(&id2));
    assert!(
        !listed.contains(&key1) && !listed.contains(&key2),
        "{listed}"
    );

    let out = prereg(&vars, &["admin", "operator-key", "revoke", &id2]);
    assert!(out.status.success(), "{}", text(&out));
    let (s, _) = app.get("/v1/admin/reviews", &key2).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let out = prereg(&vars, &["admin", "operator-key", "revoke", &id2]);
    assert!(!out.status.success(), "revoking twice is an error");
    let listed = text(&prereg(&vars, &["admin", "operator-key", "list"]));
    assert!(listed.contains("revoked"), "{listed}");
    app.cleanup().await;
}
