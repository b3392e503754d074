//! Email: templates (askama, compiled and checked at build time), rendering,
//! and a pooled SMTP transport (lettre), or, on a laptop, lettre's file
//! transport that catches every message as an `.eml` file in a directory.

use askama::Template;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use lettre::{
    message::{header::ContentType, Mailbox, MultiPart, SinglePart},
    AsyncFileTransport, AsyncTransport, Message, Tokio1Executor,
};
use thiserror::Error;

mod smtp;

/// A rendered email: exactly what is sent (the preview endpoint shows it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rendered {
    pub subject: String,
    pub html: String,
    pub text: String,
}

macro_rules! invitation_template {
    ($name:ident, $path:literal) => {
        #[derive(Template)]
        #[template(path = $path)]
        #[allow(dead_code)] // the text versions have no <title> for the subject
        struct $name<'a> {
            subject: &'a str,
            customer_name: &'a str,
            partner_name: &'a str,
            provider: &'a str,
            association_label: &'a str,
            association_meaning: &'a str,
            link: &'a str,
            validity: &'a str,
        }
    };
}

invitation_template!(InvitationEnHtml, "invitation.en.html");
invitation_template!(InvitationEnText, "invitation.en.txt");
invitation_template!(InvitationZhHtml, "invitation.zh-CN.html");
invitation_template!(InvitationZhText, "invitation.zh-CN.txt");

#[derive(Template)]
#[template(path = "notice.html")]
struct NoticeHtml<'a> {
    lang: &'a str,
    subject: &'a str,
    paragraphs: &'a [String],
    provider: &'a str,
}

#[derive(Template)]
#[template(path = "notice.txt")]
struct NoticeText<'a> {
    paragraphs: &'a [String],
    provider: &'a str,
}

/// What an invitation email says.
pub struct InvitationVars<'a> {
    pub locale: &'a str,
    pub customer_name: &'a str,
    pub partner_name: &'a str,
    pub provider: &'a str,
    pub association_type: &'a str,
    pub link: &'a str,
    /// `None`: valid while the claim is active (offline links).
    pub expires_at: Option<DateTime<Utc>>,
    pub timezone: Tz,
}

fn zh(locale: &str) -> bool {
    locale.eq_ignore_ascii_case("zh-CN")
}

pub fn render_invitation(v: &InvitationVars<'_>) -> Result<Rendered, askama::Error> {
    let zh = zh(v.locale);
    let referral = v.association_type == "referral";
    let (p, prov) = (v.partner_name, v.provider);
    let subject = if zh {
        format!("{p} 邀请您成为其在 {prov} 的客户")
    } else {
        format!("{p} invites you to become their customer on {prov}")
    };
    let label = match (zh, referral) {
        (false, false) => "reseller".to_string(),
        (false, true) => "referral".to_string(),
        (true, false) => "经销模式".to_string(),
        (true, true) => "推荐模式".to_string(),
    };
    let meaning = match (zh, referral) {
        (false, false) => format!("You sign your contract with {p} and pay {p}; {p} manages your account and billing."),
        (false, true) => format!("You sign your contract with {prov} and pay {prov} directly; {p} supports you as your referral partner."),
        (true, false) => format!("您将与 {p} 签约并向 {p} 付款，由 {p} 为您管理账号和账单。"),
        (true, true) => format!("您将直接与 {prov} 签约并向 {prov} 付款，{p} 作为推荐合作伙伴为您提供支持。"),
    };
    let validity = match (v.expires_at, zh) {
        (Some(t), false) => format!(
            "until {} ({})",
            t.with_timezone(&v.timezone).format("%Y-%m-%d %H:%M"),
            v.timezone
        ),
        (Some(t), true) => format!(
            "至 {}（{}）",
            t.with_timezone(&v.timezone).format("%Y-%m-%d %H:%M"),
            v.timezone
        ),
        (None, false) => "while your pre-registration with the partner is active".to_string(),
        (None, true) => "在合作伙伴的预注册有效期内".to_string(),
    };
    // The four templates take the same fields.
    macro_rules! fill {
        ($t:ident) => {
            $t {
                subject: &subject,
                customer_name: v.customer_name,
                partner_name: p,
                provider: prov,
                association_label: &label,
                association_meaning: &meaning,
                link: v.link,
                validity: &validity,
            }
            .render()?
        };
    }
    let (html, text) = if zh {
        (fill!(InvitationZhHtml), fill!(InvitationZhText))
    } else {
        (fill!(InvitationEnHtml), fill!(InvitationEnText))
    };
    Ok(Rendered {
        subject,
        html,
        text,
    })
}

/// A plain notice (partner notifications, reviewer reminders, escalations).
pub fn render_notice(
    locale: &str,
    provider: &str,
    subject: String,
    paragraphs: &[String],
) -> Result<Rendered, askama::Error> {
    let lang = if zh(locale) { "zh-CN" } else { "en" };
    let html = NoticeHtml {
        lang,
        subject: &subject,
        paragraphs,
        provider,
    }
    .render()?;
    let text = NoticeText {
        paragraphs,
        provider,
    }
    .render()?;
    Ok(Rendered {
        subject,
        html,
        text,
    })
}

#[derive(Debug, Error)]
pub enum SendError {
    /// Connection problems, time-outs, SMTP 4xx: try again later.
    #[error("transient: {0}")]
    Transient(String),
    /// SMTP 5xx: the server refused for good.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The message could not be built (bad address).
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The connection broke or went silent while a command or the message
    /// was under way: the server may have taken the message. Sending again
    /// could deliver it twice, so the caller must not retry.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// Whether a failed SMTP send may have delivered the message. An SMTP reply
/// (4xx/5xx) is a certain answer; a refusal by the client, a TLS failure or a
/// failed connect happened before anything was sent. What is left is a
/// connection that broke, timed out or answered garbage in the middle of
/// the exchange, possibly after the server took the message.
fn outcome_unknown(e: &lettre::transport::smtp::Error) -> bool {
    !(e.is_transient()
        || e.is_permanent()
        || e.is_client()
        || e.is_tls()
        || e.is_transport_shutdown()
        || e.to_string().starts_with("Connection error"))
}

/// Pooled SMTP transport; connects lazily, so processes start while the
/// mail server is down. With a `file://` URL, messages are caught in a
/// directory instead (development: `prereg dev`).
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
}

enum Transport {
    Smtp(smtp::Pool),
    File(AsyncFileTransport<Tokio1Executor>, std::path::PathBuf),
}

impl Mailer {
    /// `url`: `smtp://host:port` (plain), `smtp://...?tls=required`
    /// (STARTTLS) or `smtps://host` (TLS), with `user:pass@` for AUTH; or
    /// `file:///a/directory` to write each message to `<id>.eml` there.
    pub fn new(
        url: &str,
        from: &str,
        pool_size: u32,
        timeout: std::time::Duration,
    ) -> Result<Self, String> {
        Self::with_ca_file(url, from, pool_size, timeout, None)
    }

    /// [`Mailer::new`], and with `ca_file` (`PREREG_SMTP_CA_FILE`) the PEM
    /// certificates in that file are trusted for the TLS connection to the
    /// mail server, besides the public roots (a private CA). Ignored by the
    /// `file://` transport.
    pub fn with_ca_file(
        url: &str,
        from: &str,
        pool_size: u32,
        timeout: std::time::Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let transport = if let Some(dir) = url.strip_prefix("file://") {
            if dir.is_empty() {
                return Err("PREREG_SMTP_URL: file:// needs a directory".into());
            }
            let dir = std::path::PathBuf::from(dir);
            std::fs::create_dir_all(&dir).map_err(|e| {
                format!(
                    "PREREG_SMTP_URL: cannot create the mail directory {}: {e}",
                    dir.display()
                )
            })?;
            Transport::File(AsyncFileTransport::new(&dir), dir)
        } else {
            let ca_pem = ca_file
                .map(|path| {
                    std::fs::read(path).map_err(|e| {
                        format!("PREREG_SMTP_CA_FILE: cannot read {}: {e}", path.display())
                    })
                })
                .transpose()?;
            Transport::Smtp(smtp::Pool::new(
                smtp::Server::parse(url, ca_pem.as_deref(), timeout)?,
                pool_size,
            )?)
        };
        let from = from
            .parse::<Mailbox>()
            .map_err(|e| format!("PREREG_MAIL_FROM: {e}"))?;
        Ok(Self { transport, from })
    }

    /// The directory messages are caught in (file transport), if any.
    pub fn caught_dir(&self) -> Option<&std::path::Path> {
        match &self.transport {
            Transport::File(_, dir) => Some(dir),
            Transport::Smtp(_) => None,
        }
    }

    /// Sends and returns the server's reply to the message.
    pub async fn send(
        &self,
        to: &str,
        mail: &Rendered,
        message_id: &str,
    ) -> Result<String, SendError> {
        let to: Mailbox = to
            .parse()
            .map_err(|e| SendError::Invalid(format!("recipient: {e}")))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .message_id(Some(format!("<{message_id}@prereg>")))
            .multipart(
                MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(mail.text.clone()),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(mail.html.clone()),
                    ),
            )
            .map_err(|e| SendError::Invalid(e.to_string()))?;
        match &self.transport {
            Transport::Smtp(pool) => {
                // Taking a connection (opening one, or a NOOP on an idle
                // one) sends nothing of the message: its failures are
                // certain, a plain retry or a refusal for good.
                let exchange = match pool.checkout().await {
                    Ok(exchange) => exchange,
                    Err(smtp::CheckoutError::Permanent(e)) => return Err(SendError::Permanent(e)),
                    Err(smtp::CheckoutError::Transient(e)) => return Err(SendError::Transient(e)),
                };
                match exchange
                    .send(message.envelope(), &message.formatted())
                    .await
                {
                    Ok(resp) => Ok(format!(
                        "{} {}",
                        resp.code(),
                        resp.message().collect::<Vec<_>>().join(" ")
                    )),
                    Err(e) if e.is_permanent() => Err(SendError::Permanent(e.to_string())),
                    Err(e) if outcome_unknown(&e) => Err(SendError::Unknown(e.to_string())),
                    Err(e) => Err(SendError::Transient(e.to_string())),
                }
            }
            Transport::File(t, _) => match t.send(message).await {
                Ok(id) => Ok(format!("250 caught as {id}.eml")),
                Err(e) => Err(SendError::Transient(format!("file transport: {e}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(locale: &'a str, kind: &'a str) -> InvitationVars<'a> {
        InvitationVars {
            locale,
            customer_name: "Zhang <San>",
            partner_name: "Acme Cloud",
            provider: "Example Cloud",
            association_type: kind,
            link: "https://p.example/i/tok",
            expires_at: Some("2026-11-28T08:00:00Z".parse().unwrap()),
            timezone: chrono_tz::Asia::Shanghai,
        }
    }

    #[test]
    fn invitation_in_both_languages_and_types() {
        let en = render_invitation(&vars("en", "reseller")).unwrap();
        assert!(en.subject.contains("Acme Cloud"));
        assert!(en.text.contains("https://p.example/i/tok"));
        assert!(en.text.contains("until 2026-11-28 16:00 (Asia/Shanghai)"));
        assert!(en.text.contains("pay Acme Cloud"));
        // HTML is escaped; text is not.
        assert!(en.html.contains("Zhang &lt;San&gt;"));
        assert!(en.text.contains("Zhang <San>"));
        let zh = render_invitation(&vars("zh-CN", "referral")).unwrap();
        assert!(zh.subject.contains("邀请"));
        assert!(zh.text.contains("推荐模式"));
        assert!(zh.text.contains("Example Cloud 付款"));
        assert!(zh.html.contains("lang=\"zh-CN\""));
    }

    #[test]
    fn a_ca_file_needs_a_tls_url_and_a_certificate() {
        // Any well-formed certificate will do for the parsing checks.
        const PEM: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUX2FyZ3VtZW50c19hcmVfbm90X2NoZWNrZWQwCgYIKoZIzj0EAwIw\n-----END CERTIFICATE-----\n";
        let timeout = std::time::Duration::from_secs(1);
        let err = |url: &str, pem: &[u8]| {
            smtp::Server::parse(url, Some(pem), timeout)
                .err()
                .unwrap_or_default()
        };
        assert!(err("smtp://127.0.0.1:25", PEM).contains("uses no TLS"));
        assert!(err("smtps://127.0.0.1:465", b"not a certificate").contains("no PEM certificate"));
        assert!(smtp::Server::parse("smtp://127.0.0.1:25", None, timeout).is_ok());
        assert!(smtp::Server::parse("imap://127.0.0.1", None, timeout)
            .err()
            .unwrap_or_default()
            .contains("unknown scheme"));
    }

    #[test]
    fn notice_renders_paragraphs() {
        let n = render_notice(
            "en",
            "Example Cloud",
            "Subject".into(),
            &["One.".into(), "Two.".into()],
        )
        .unwrap();
        assert!(n.text.starts_with("One.\n\nTwo."));
        assert!(n.html.contains("<p>Two.</p>"));
    }
}
