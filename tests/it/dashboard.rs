//! The operators' dashboard, opened in headless Chromium (chromedriver).

use std::{process::Stdio, time::Duration};

use fantoccini::{error::CmdError, Client, ClientBuilder, Locator};
use prereg::mq::{CloudEvent, Queue};
use serde_json::json;

use crate::common::*;

pub struct Driver {
    child: std::process::Child,
    pub port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether the browser tests can run here. `PREREG_BROWSER_TESTS=0` opts
/// out; a missing Chromium or ChromeDriver skips them with a visible note on
/// a developer's machine and fails them in CI (`CI` set), where `.ci/run`
/// installs both.
pub fn browser_available(test: &str) -> bool {
    if std::env::var("PREREG_BROWSER_TESTS").as_deref() == Ok("0") {
        eprintln!("SKIPPED {test}: PREREG_BROWSER_TESTS=0, browser test not run");
        return false;
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let driver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let driver_found = std::process::Command::new(&driver)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if std::path::Path::new(&chromium).exists() && driver_found {
        return true;
    }
    let why = format!(
        "{test}: Chromium ({chromium}) or ChromeDriver ({driver}) missing; install the Debian packages chromium and chromium-driver"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set: browser tests must run)");
    }
    eprintln!("SKIPPED {why}");
    false
}

pub async fn chromedriver() -> Driver {
    let port = free_port();
    let child = std::process::Command::new(std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver installed (Debian packages chromium and chromium-driver; .ci/run installs them)");
    let driver = Driver { child, port };
    wait_until(Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    driver
}

/// A headless Chromium session through `driver`, with `extra` arguments.
pub async fn headless(driver: &Driver, extra: &[&str]) -> Client {
    // Two TLS back ends are linked in (via the WebDriver client): pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ];
    args.extend_from_slice(extra);
    let caps = json!({"goog:chromeOptions": {
        "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
        "args": args,
    }});
    ClientBuilder::rustls()
        .expect("tls")
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session")
}

/// Opens the dashboard at `addr` and asserts that it sends to the sign-in page.
pub async fn expect_sign_in(browser: &Client, addr: &str) -> Result<(), CmdError> {
    browser.goto(&format!("{addr}/admin")).await?;
    let url = browser.current_url().await?;
    assert!(url.path().ends_with("/admin/login"), "{url}");
    Ok(())
}

/// Signs in on the sign-in page with `key`, then waits for element `then`.
pub async fn sign_in(browser: &Client, key: &str, then: &str) -> Result<(), CmdError> {
    browser
        .find(Locator::Id("key"))
        .await?
        .send_keys(key)
        .await?;
    browser.find(Locator::Id("sign-in")).await?.click().await?;
    browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id(then))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_queues_dead_letters_and_replays_them() {
    if !browser_available("dashboard_shows_queues_dead_letters_and_replays_them") {
        return;
    }
    let app = spawn_app().await;
    // One poison message in the registration dead-letter queue.
    let bad = CloudEvent::new("preregistration.requested", json!({"id": "not-a-uuid"}));
    app.ctx.broker.publish_command(&bad).await.unwrap();
    assert_eq!(app.dead_letters(Queue::Registration, 1).await.len(), 1);

    let driver = chromedriver().await;
    let browser = headless(&driver, &["--disable-quic"]).await;
    let run = async {
        // Not signed in: sent to the sign-in page; a wrong key is refused.
        expect_sign_in(&browser, &app.addr).await?;
        sign_in(&browser, "not-a-key", "error").await?;
        sign_in(&browser, OPERATOR, "queues").await?;
        assert!(browser.current_url().await?.path().ends_with("/admin"));
        // The page shows every queue with its consumers, and the dead letter with its reason.
        let queues = browser.find(Locator::Id("queues")).await?.text().await?;
        for q in Queue::ALL {
            assert!(queues.contains(q.short()), "{queues}");
        }
        let dead = browser
            .find(Locator::Id("dlq-registration"))
            .await?
            .text()
            .await?;
        assert!(dead.contains("registration"), "{dead}");
        let reasons = browser
            .find(Locator::Css("table.dead td.reason"))
            .await?
            .text()
            .await?;
        assert_eq!(reasons, "invalid_payload");
        let tile = browser.find(Locator::Id("tile-dead")).await?.text().await?;
        assert!(tile.contains('1'), "{tile}");
        // Replay: the message goes back (and, still invalid, returns to the DLQ).
        browser
            .find(Locator::Id("replay-registration"))
            .await?
            .click()
            .await?;
        // "Replay every dead letter of registration?"
        browser.accept_alert().await?;
        let flash = browser
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id("flash"))
            .await?
            .text()
            .await?;
        assert!(
            flash.contains("Replayed 1 message(s) of registration"),
            "{flash}"
        );
        Ok::<_, fantoccini::error::CmdError>(())
    };
    let result = run.await;
    let _ = browser.close().await;
    result.expect("browser steps");
    let replays = app.audits("dead_letters.replayed").await;
    assert_eq!(replays, 1);
    app.cleanup().await;
}
