//! The SMTP connections: where the mail server is (parsed once from
//! `PREREG_SMTP_URL`), how a connection is opened, and a bounded pool of them
//! (deadpool over lettre's `AsyncSmtpConnection`).
//!
//! Why not lettre's own pooled transport: it opens a fresh connection
//! whenever every pooled one is busy and closes it again when it comes back
//! to a full pool (under load about one connection per two emails, each a
//! TCP connect, greeting, EHLO and, against a real relay, a TLS handshake
//! and AUTH), and it bounds only the TCP connect, so a server that accepts
//! and then says nothing could only be caught by an extra `NOOP` exchange
//! before every message. Here the pool holds at most `size` connections and
//! a sender waits for a free one; taking a connection (a new one: connect,
//! greeting, EHLO, STARTTLS, AUTH; an idle one: `NOOP`) happens before any
//! part of a message is sent, under the SMTP timeout, so a failure there is
//! certain to have sent nothing.

use std::{borrow::Cow, time::Duration};

use tokio::net::TcpStream;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};
use lettre::transport::smtp::{
    authentication::{Credentials, Mechanism},
    client::{AsyncSmtpConnection, Certificate, Tls, TlsParameters},
    extension::ClientId,
    Error,
};

/// Ports lettre uses when the URL names none.
const SMTP_PORT: u16 = 25;
const SUBMISSION_PORT: u16 = 587;
const SUBMISSIONS_PORT: u16 = 465;

/// Where the mail server is and how to talk to it.
pub(crate) struct Server {
    host: String,
    port: u16,
    tls: Tls,
    hello: ClientId,
    credentials: Option<Credentials>,
    timeout: Duration,
}

impl Server {
    /// Parses `url` as lettre's `from_url` does (`smtp://host:port`,
    /// `?tls=required|opportunistic` for STARTTLS, `smtps://` for implicit
    /// TLS, `user:pass@` for AUTH, a path for the EHLO name). With `ca_pem`
    /// (the contents of `PREREG_SMTP_CA_FILE`) its certificates are trusted
    /// as roots besides the public ones; a URL without TLS is refused then,
    /// since the CA would silently go unused.
    pub(crate) fn parse(
        url: &str,
        ca_pem: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let err = |e: &dyn std::fmt::Display| format!("PREREG_SMTP_URL: {e}");
        let parsed = url::Url::parse(url).map_err(|e| err(&e))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| err(&"no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls_query = parsed
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .map(|(_, v)| v.into_owned());
        let params = || -> Result<TlsParameters, String> {
            let Some(pem) = ca_pem else {
                return TlsParameters::new(host.clone()).map_err(|e| err(&e));
            };
            const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
            if !pem.windows(BEGIN.len()).any(|w| w == BEGIN) {
                return Err("PREREG_SMTP_CA_FILE: no PEM certificate in the file".into());
            }
            let cert =
                Certificate::from_pem(pem).map_err(|e| format!("PREREG_SMTP_CA_FILE: {e}"))?;
            TlsParameters::builder(host.clone())
                .add_root_certificate(cert)
                .build()
                .map_err(|e| format!("PREREG_SMTP_CA_FILE: {e}"))
        };
        let (tls, default_port) = match (parsed.scheme(), tls_query.as_deref()) {
            ("smtps", _) => (Tls::Wrapper(params()?), SUBMISSIONS_PORT),
            ("smtp", Some("required")) => (Tls::Required(params()?), SUBMISSION_PORT),
            ("smtp", Some("opportunistic")) => (Tls::Opportunistic(params()?), SUBMISSION_PORT),
            ("smtp", None) if ca_pem.is_some() => {
                return Err(
                    "PREREG_SMTP_CA_FILE is set but PREREG_SMTP_URL uses no TLS (use smtps:// or ?tls=required)"
                        .into(),
                )
            }
            ("smtp", None) => (Tls::None, SMTP_PORT),
            (scheme, tls) => {
                return Err(err(&format!(
                    "unknown scheme '{scheme}' or tls parameter {tls:?} (smtp://, smtp://…?tls=required|opportunistic, smtps://)"
                )))
            }
        };
        let hello = match parsed.path().trim_matches('/') {
            "" => ClientId::default(),
            name => ClientId::Domain(name.to_string()),
        };
        let credentials = match parsed.password() {
            None => None,
            Some(password) => {
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(Cow::into_owned)
                        .map_err(|e| err(&e))
                };
                Some(Credentials::new(
                    decode(parsed.username())?,
                    decode(password)?,
                ))
            }
        };
        Ok(Self {
            host,
            port: parsed.port().unwrap_or(default_port),
            tls,
            hello,
            credentials,
            timeout,
        })
    }

    /// Opens a connection: TCP (or TLS) connect, greeting and EHLO, STARTTLS
    /// where the URL asks for it (refused, not skipped, when required and
    /// the server does not offer it), AUTH with the URL's credentials.
    async fn connect(&self) -> Result<AsyncSmtpConnection, ConnectError> {
        let mut conn = match &self.tls {
            // lettre does the TLS handshake before the greeting here, on a
            // socket of its own, so Nagle stays on: each message waits for
            // the server's delayed ACK (see `tcp`). Prefer STARTTLS.
            Tls::Wrapper(params) => {
                AsyncSmtpConnection::connect_tokio1(
                    (self.host.as_str(), self.port),
                    Some(self.timeout),
                    &self.hello,
                    Some(params.clone()),
                    None,
                )
                .await?
            }
            _ => {
                AsyncSmtpConnection::connect_with_transport(
                    Box::new(self.tcp().await?),
                    &self.hello,
                )
                .await?
            }
        };
        match &self.tls {
            Tls::Opportunistic(params) if conn.can_starttls() => {
                conn.starttls(params.clone(), &self.hello).await?
            }
            Tls::Required(params) => conn.starttls(params.clone(), &self.hello).await?,
            _ => {}
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(conn)
    }

    /// A TCP connection to the server (each of its addresses in turn), with
    /// Nagle off. lettre writes a message and its closing `.` in two writes
    /// before it reads the reply; with Nagle on, the dot waits for the server
    /// to acknowledge the message, and servers delay that ACK (40 ms on
    /// Linux), so every message on a reused connection took 40 ms (measured:
    /// 16 pooled connections carried 355 emails/s; with Nagle off, see
    /// docs/benchmarks.md). The pool's create timeout bounds it.
    async fn tcp(&self) -> Result<TcpStream, std::io::Error> {
        let stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connection error: {0}")]
    Tcp(#[from] std::io::Error),
    #[error(transparent)]
    Smtp(#[from] Error),
}

impl managed::Manager for Server {
    type Type = AsyncSmtpConnection;
    type Error = ConnectError;

    async fn create(&self) -> Result<AsyncSmtpConnection, ConnectError> {
        self.connect().await
    }

    /// An idle connection is checked with a `NOOP` before it carries a
    /// message: a server that closed it meanwhile is found out here, where
    /// nothing has been sent, not halfway through the next message.
    async fn recycle(
        &self,
        conn: &mut AsyncSmtpConnection,
        _: &Metrics,
    ) -> RecycleResult<ConnectError> {
        if conn.has_broken() || !conn.test_connected().await {
            return Err(RecycleError::message("connection closed"));
        }
        Ok(())
    }
}

/// A bounded pool of SMTP connections to one server.
pub(crate) struct Pool(managed::Pool<Server>);

/// Why no connection could be had. Nothing of a message was sent.
pub(crate) enum CheckoutError {
    /// The server refused for good (e.g. AUTH rejected with a 5xx).
    Permanent(String),
    /// Anything else: try again later.
    Transient(String),
}

impl Pool {
    /// At most `size` connections, opened as senders need them. Opening or
    /// checking one must finish within the server's timeout; waiting for a
    /// free one may take as long again.
    pub(crate) fn new(server: Server, size: u32) -> Result<Self, String> {
        let timeout = server.timeout;
        let pool = managed::Pool::builder(server)
            .max_size(size.max(1) as usize)
            .runtime(deadpool::Runtime::Tokio1)
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .wait_timeout(Some(timeout))
            .build()
            .map_err(|e| format!("SMTP pool: {e}"))?;
        Ok(Self(pool))
    }

    /// A connection ready to carry a message.
    pub(crate) async fn checkout(&self) -> Result<Exchange, CheckoutError> {
        let timeout = self.0.manager().timeout;
        match self.0.get().await {
            Ok(conn) => Ok(Exchange(Some(conn))),
            Err(PoolError::Backend(ConnectError::Smtp(e))) if e.is_permanent() => {
                Err(CheckoutError::Permanent(e.to_string()))
            }
            Err(PoolError::Backend(e)) => Err(CheckoutError::Transient(e.to_string())),
            Err(PoolError::Timeout(managed::TimeoutType::Wait)) => Err(CheckoutError::Transient(
                format!("every SMTP connection stayed busy for {timeout:?}; nothing was sent"),
            )),
            Err(PoolError::Timeout(_)) => Err(CheckoutError::Transient(format!(
                "mail server did not answer within {timeout:?}; nothing was sent"
            ))),
            Err(e) => Err(CheckoutError::Transient(e.to_string())),
        }
    }
}

/// A checked-out connection carrying one message. It goes back to the pool
/// only through [`Exchange::send`] finishing cleanly; dropped in the middle
/// of an exchange (the caller's deadline), the connection is closed rather
/// than handed to the next sender halfway through a message.
pub(crate) struct Exchange(Option<Object<Server>>);

impl Exchange {
    pub(crate) async fn send(
        mut self,
        envelope: &lettre::address::Envelope,
        message: &[u8],
    ) -> Result<lettre::transport::smtp::response::Response, Error> {
        let conn = self.0.as_mut().expect("an exchange holds its connection");
        let result = conn.send(envelope, message).await;
        if !conn.has_broken() {
            // Whole: back to the pool for the next message.
            self.0.take();
        }
        result
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Detached from the pool and closed.
            drop(Object::take(conn));
        }
    }
}

#[cfg(test)]
mod tests {
    use prereg_devtools::smtp_sink::SmtpSink;

    use super::*;

    /// With every connection of the pool in use, a sender waits at most the
    /// server's timeout and is told so (transient: nothing was sent); once
    /// the connection's exchange is done, the next sender gets it, and no
    /// second connection is opened.
    #[tokio::test]
    async fn a_sender_waits_for_a_busy_pool_at_most_the_timeout_then_gets_the_freed_connection() {
        let sink = SmtpSink::start().await.unwrap();
        let server = Server::parse(&sink.url(), None, Duration::from_millis(300)).unwrap();
        let pool = Pool::new(server, 1).unwrap();
        let held = match pool.checkout().await {
            Ok(x) => x,
            Err(_) => panic!("the first sender gets a connection"),
        };
        let started = std::time::Instant::now();
        // Bounded here too, so that a pool without a wait timeout fails the
        // test instead of hanging it.
        let second = tokio::time::timeout(Duration::from_secs(5), pool.checkout())
            .await
            .expect("waited past 5 s for a busy pool");
        match second {
            Err(CheckoutError::Transient(why)) => {
                assert!(why.contains("stayed busy"), "{why}")
            }
            Err(CheckoutError::Permanent(why)) => panic!("permanent: {why}"),
            Ok(_) => panic!("a second connection beyond the pool's size"),
        }
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "gave up before the timeout"
        );
        // A whole exchange hands the connection back to the pool.
        let envelope = lettre::address::Envelope::new(
            Some("noreply@prereg.example".parse().unwrap()),
            vec!["customer@example.com".parse().unwrap()],
        )
        .unwrap();
        held.send(&envelope, b"Subject: pooled\r\n\r\nhello\r\n")
            .await
            .unwrap();
        assert!(pool.checkout().await.is_ok(), "the freed connection");
        assert_eq!(sink.connections(), 1);
        assert_eq!(sink.count(), 1);
        sink.shutdown();
    }

    fn parse(url: &str) -> Server {
        Server::parse(url, None, Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn the_url_gives_lettres_default_ports_tls_modes_credentials_and_ehlo_name() {
        let plain = parse("smtp://mail.example");
        assert_eq!((plain.host.as_str(), plain.port), ("mail.example", 25));
        assert!(matches!(plain.tls, Tls::None));
        assert!(plain.credentials.is_none());
        assert!(matches!(
            parse("smtp://h?tls=required").tls,
            Tls::Required(_)
        ));
        assert_eq!(parse("smtp://h?tls=required").port, 587);
        assert!(matches!(
            parse("smtp://h?tls=opportunistic").tls,
            Tls::Opportunistic(_)
        ));
        assert!(matches!(parse("smtps://h").tls, Tls::Wrapper(_)));
        assert_eq!(parse("smtps://h").port, 465);
        assert_eq!(parse("smtps://h:2465").port, 2465);
        // Credentials are percent-decoded; the path names the EHLO domain.
        let auth = parse("smtp://us%40er:p%3Ass@h:2525/relay.example");
        assert_eq!(
            auth.credentials,
            Some(Credentials::new("us@er".into(), "p:ss".into()))
        );
        assert_eq!(auth.hello, ClientId::Domain("relay.example".into()));
        // An IPv6 literal loses its brackets for the connect.
        assert_eq!(parse("smtp://[::1]:2525").host, "::1");
    }
}
