//! Email: templates (askama, compiled and checked at build time), rendering,
//! and a pooled SMTP transport (lettre).

use askama::Template;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use lettre::{
    message::{header::ContentType, Mailbox, MultiPart, SinglePart},
    transport::smtp::PoolConfig,
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use thiserror::Error;

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
}

/// Pooled SMTP transport; connects lazily, so processes start while the
/// mail server is down.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// `url`: `smtp://host:port` (plain), `smtp://...?tls=required`
    /// (STARTTLS) or `smtps://host` (TLS), with `user:pass@` for AUTH.
    pub fn new(
        url: &str,
        from: &str,
        pool_size: u32,
        timeout: std::time::Duration,
    ) -> Result<Self, String> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| format!("PREREG_SMTP_URL: {e}"))?
            .pool_config(PoolConfig::new().max_size(pool_size.max(1)))
            .timeout(Some(timeout))
            .build();
        let from = from
            .parse::<Mailbox>()
            .map_err(|e| format!("PREREG_MAIL_FROM: {e}"))?;
        Ok(Self { transport, from })
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
        match self.transport.send(message).await {
            Ok(resp) => Ok(format!(
                "{} {}",
                resp.code(),
                resp.message().collect::<Vec<_>>().join(" ")
            )),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(e.to_string())),
            Err(e) => Err(SendError::Transient(e.to_string())),
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
