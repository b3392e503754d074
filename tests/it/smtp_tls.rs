//! SMTP over STARTTLS and implicit TLS, through the real email worker to the
//! dev sink serving a certificate from a throwaway CA made here; the app
//! trusts that CA only through `PREREG_SMTP_CA_FILE`. Nothing may go out in
//! clear when TLS is asked for, nor to a server whose certificate the CA did
//! not sign.

use std::path::PathBuf;
use std::time::Duration;

use prereg_devtools::smtp_sink::{SinkTls, SmtpSink};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{json, Value};

use crate::common::*;

/// A CA and a server certificate it signed for `127.0.0.1` and `localhost`.
struct Pki {
    ca_pem: String,
    server: SinkTls,
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name
        .push(DnType::CommonName, format!("prereg test CA {name}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "smtp sink");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");
    Pki {
        ca_pem: ca_cert.pem(),
        server: SinkTls::from_pem(&cert.pem(), &key.serialize_pem()).expect("sink TLS"),
    }
}

/// The CA written to a file of its own, removed on drop.
struct CaFile(PathBuf);

impl CaFile {
    fn new(pem: &str) -> CaFile {
        let path =
            std::env::temp_dir().join(format!("prereg-smtp-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, pem).expect("write CA file");
        CaFile(path)
    }
}

impl Drop for CaFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The app sending through `url`, trusting `ca` if given; retries quick.
async fn app(url: String, ca: Option<&CaFile>) -> TestApp {
    let ca = ca.map(|f| f.0.clone());
    spawn_with(move |c| {
        c.smtp_url = url;
        c.smtp_ca_file = ca;
        c.smtp_timeout = Duration::from_secs(5);
    })
    .await
}

/// Invites one claimed customer; returns the partner and the invitation.
async fn invite_one(app: &TestApp) -> (Partner, String) {
    let p = app.create_partner(json!({})).await;
    let id = app
        .claimed(&p, "tls.customer@customer.example", "+8613700000042")
        .await;
    let inv = app.invite(&p, id).await;
    (p, inv)
}

/// Waits until the invitation is `sent` or `failed`; returns it.
async fn settled(app: &TestApp, p: &Partner, inv: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..600 {
        let (_, v) = app.get(&format!("/v1/invitations/{inv}"), &p.key).await;
        if v["status"] == "sent" || v["status"] == "failed" {
            return v;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("invitation {inv} never settled: {last}");
}

/// The verbs the sink received in clear and over TLS.
fn verbs(sink: &SmtpSink, tls: bool) -> Vec<String> {
    sink.commands()
        .into_iter()
        .filter(|c| c.tls == tls)
        .map(|c| c.verb)
        .collect()
}

const TRANSACTION: [&str; 4] = ["AUTH", "MAIL", "RCPT", "DATA"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invitation_goes_out_over_starttls_with_auth_only_after_the_upgrade() {
    let pki = pki("starttls");
    let ca = CaFile::new(&pki.ca_pem);
    let sink = SmtpSink::start_starttls(pki.server.clone()).await.unwrap();
    sink.require_auth("mailer", "tls-pw");
    let url = format!("smtp://mailer:tls-pw@{}?tls=required", sink.addr());
    let app = app(url, Some(&ca)).await;
    let (p, inv) = invite_one(&app).await;
    let v = settled(&app, &p, &inv).await;
    assert_eq!(v["status"], "sent", "{v}");
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "the message came in clear");
    assert_eq!(got[0].to, vec!["tls.customer@customer.example".to_string()]);
    assert!(sink.tls_sessions() >= 1);
    assert_eq!(sink.tls_failures(), 0);
    // In clear: only the greeting exchange and the upgrade; the credentials
    // and the message only over TLS.
    let clear = verbs(&sink, false);
    assert!(clear.iter().any(|v| v == "STARTTLS"), "{clear:?}");
    assert!(
        clear.iter().all(|v| v == "EHLO" || v == "STARTTLS"),
        "sent in clear: {clear:?}"
    );
    let encrypted = verbs(&sink, true);
    for verb in TRANSACTION {
        assert!(
            encrypted.iter().any(|v| v == verb),
            "{verb} not seen over TLS: {encrypted:?}"
        );
    }
    assert!(sink.logins() >= 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invitation_goes_out_over_implicit_tls() {
    let pki = pki("implicit");
    let ca = CaFile::new(&pki.ca_pem);
    let sink = SmtpSink::start_tls(pki.server.clone()).await.unwrap();
    assert!(sink.url().starts_with("smtps://"));
    let app = app(sink.url(), Some(&ca)).await;
    let (p, inv) = invite_one(&app).await;
    let v = settled(&app, &p, &inv).await;
    assert_eq!(v["status"], "sent", "{v}");
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].tls);
    assert!(sink.tls_sessions() >= 1);
    assert!(verbs(&sink, false).is_empty(), "{:?}", sink.commands());
    app.cleanup().await;
}

/// `?tls=required` against a server that offers no STARTTLS: the worker
/// never starts a transaction in clear. The failure is transient for the
/// mailer (a server may be fixed), so the job is retried until its attempts
/// run out and the invitation fails, naming the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_against_a_server_without_starttls_sends_nothing_in_clear() {
    let sink = SmtpSink::start().await.unwrap();
    let url = format!("smtp://{}?tls=required", sink.addr());
    let app = app(url, None).await;
    let (p, inv) = invite_one(&app).await;
    let v = settled(&app, &p, &inv).await;
    assert_eq!(v["status"], "failed", "{v}");
    let failure = v["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("STARTTLS"), "{failure}");
    // Tried on every attempt, never past EHLO.
    assert!(
        sink.connections() >= app.cfg.max_attempts as usize,
        "{} connections for {} attempts",
        sink.connections(),
        app.cfg.max_attempts
    );
    assert_eq!(sink.count(), 0);
    let clear = verbs(&sink, false);
    assert!(
        clear.iter().all(|v| !TRANSACTION.contains(&v.as_str())),
        "a transaction began in clear: {clear:?}"
    );
    app.cleanup().await;
}

/// A server whose certificate was signed by another CA than the configured
/// one is refused, over STARTTLS and over implicit TLS: the handshake fails
/// on the client's side, nothing is sent, and the invitation fails after
/// its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_and_nothing_is_sent() {
    let trusted = pki("trusted");
    let other = pki("other");
    let ca = CaFile::new(&trusted.ca_pem);
    for implicit in [false, true] {
        let sink = if implicit {
            SmtpSink::start_tls(other.server.clone()).await.unwrap()
        } else {
            SmtpSink::start_starttls(other.server.clone())
                .await
                .unwrap()
        };
        let app = app(sink.url(), Some(&ca)).await;
        let (p, inv) = invite_one(&app).await;
        let v = settled(&app, &p, &inv).await;
        assert_eq!(v["status"], "failed", "implicit={implicit}: {v}");
        assert_eq!(sink.count(), 0, "implicit={implicit}");
        assert_eq!(sink.tls_sessions(), 0, "implicit={implicit}");
        assert!(
            sink.tls_failures() >= app.cfg.max_attempts as usize,
            "implicit={implicit}: {} failed handshakes",
            sink.tls_failures()
        );
        assert!(verbs(&sink, true).is_empty(), "implicit={implicit}");
        let clear = verbs(&sink, false);
        assert!(
            clear.iter().all(|v| !TRANSACTION.contains(&v.as_str())),
            "implicit={implicit}: {clear:?}"
        );
        app.cleanup().await;
    }
}
