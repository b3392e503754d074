//! A small, real SMTP server used as an email sink by the tests and by the
//! local benchmark: an RFC 5321 subset over plain TCP, or with a given
//! certificate over STARTTLS (RFC 3207, [`SmtpSink::start_starttls`]) or
//! implicit TLS ([`SmtpSink::start_tls`]); `AUTH PLAIN` only when
//! [`SmtpSink::require_auth`] asks for it. What arrived encrypted is
//! recorded ([`ReceivedMail::tls`], [`SmtpSink::commands`],
//! [`SmtpSink::tls_sessions`]).
//! Besides scripted replies ([`SmtpSink::script`]), it can take a message
//! and then withhold the reply, drop the connection or answer late
//! ([`SmtpSink::after_data`]): the outcomes a client cannot know.
//!
//! It speaks enough ESMTP for a real client (lettre, with or without its
//! connection pool): `EHLO`/`HELO`, `MAIL`, `RCPT`, `DATA` (with
//! dot-unstuffing), `RSET`, `NOOP` and `QUIT`, with `PIPELINING` advertised.
//! Accepted messages are kept in memory (or only counted, in benchmark mode),
//! and replies to `MAIL`, `RCPT` and the end of `DATA` can be scripted to
//! exercise the sender's handling of transient and permanent failures.
//!
//! One tokio task serves each connection; a task never panics on what the
//! network sends, and a client that vanishes mid-conversation is only logged
//! (at debug level).

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// Largest message accepted, as advertised by `SIZE` (10 MiB).
const MAX_MESSAGE: usize = 10 * 1024 * 1024;
/// Longest command line (RFC 5321 asks for at least 512 octets).
const MAX_COMMAND_LINE: usize = 4 * 1024;
/// Longest line inside `DATA` (RFC 5321 asks for at least 1000 octets).
const MAX_DATA_LINE: usize = 64 * 1024;
/// Most recipients in one transaction (RFC 5321 asks for at least 100).
const MAX_RECIPIENTS: usize = 1000;
/// A connection silent this long is closed with a 421.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

const GREETING: &[u8] = b"220 sink ESMTP\r\n";
/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The EHLO reply: the name line, the optional extensions, then these.
const EHLO_NAME: &[u8] = b"250-sink\r\n";
const EHLO_STARTTLS: &[u8] = b"250-STARTTLS\r\n";
const EHLO_AUTH: &[u8] = b"250-AUTH PLAIN\r\n";
const EHLO_REST: &[u8] = b"250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n";

/// One message the sink accepted (answered 2xx after `DATA`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The reverse path of `MAIL FROM:<…>`, without angle brackets (empty for `<>`).
    pub from: String,
    /// The accepted forward paths of `RCPT TO:<…>`, in order.
    pub to: Vec<String>,
    /// The raw message after `DATA`: headers and body, dot-unstuffed, line
    /// ends kept as sent (CRLF), without the terminating `.` line. Bytes that
    /// are not UTF-8 are replaced by U+FFFD.
    pub data: String,
    /// Whether it arrived over TLS (implicit, or after `STARTTLS`).
    pub tls: bool,
}

/// One command line the sink received (recorded unless in benchmark mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenCommand {
    /// The verb, upper-cased (`EHLO`, `MAIL`, `STARTTLS`, …).
    pub verb: String,
    /// Whether it came over TLS.
    pub tls: bool,
}

/// The certificate (chain) and private key the sink presents for TLS.
#[derive(Clone)]
pub struct SinkTls(TlsAcceptor);

impl SinkTls {
    /// From PEM: the server certificate first, then any intermediates; and
    /// its private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert_chain_pem: &str, key_pem: &str) -> io::Result<SinkTls> {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}"))
        };
        let chain = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate", &e))?;
        if chain.is_empty() {
            return Err(invalid("certificate", &"no PEM certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| invalid("private key", &e))?;
        // An explicit provider: the process may have more than one compiled in.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS versions", &e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| invalid("certificate and key", &e))?;
        Ok(SinkTls(TlsAcceptor::from(Arc::new(config))))
    }
}

impl std::fmt::Debug for SinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SinkTls")
    }
}

/// How connections are secured.
#[derive(Debug, Clone)]
enum Mode {
    Plain,
    /// Plain at first; `STARTTLS` is advertised and upgrades the connection.
    StartTls(SinkTls),
    /// TLS from the first byte (`smtps`).
    Implicit(SinkTls),
}

/// A scripted reply for the next MAIL / RCPT / DATA-end (consumed in order, across connections); when the script is empty every command succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The reply to the next `MAIL FROM`.
    Mail,
    /// The reply to the next `RCPT TO`.
    Rcpt,
    /// The reply after the next message's terminating `.`.
    Data,
}

/// What the sink does right after it has taken a message (read its
/// terminating `.` and counted it as accepted), instead of answering `250`
/// at once: the failures whose outcome the client cannot know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterData {
    /// Never answer: the connection stays open and silent until the client
    /// closes it or the sink shuts down (a server that took the message and
    /// hung).
    Stall,
    /// Close the connection without answering (a server or network that
    /// failed right after taking the message).
    Drop,
    /// Answer `250` only after this long.
    Delay(Duration),
}

/// A running SMTP sink. Stops accepting (and closes idle connections) on
/// [`SmtpSink::shutdown`] or when dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

struct Shared {
    /// Scripted replies, in the order they were queued; each stage takes the
    /// first entry of its own kind.
    script: Mutex<VecDeque<(Stage, u16, String)>>,
    /// What to do after the next accepted messages, in order.
    after_data: Mutex<VecDeque<AfterData>>,
    /// `AUTH PLAIN` credentials required before `MAIL`, if any.
    auth: Mutex<Option<(String, String)>>,
    logins: AtomicUsize,
    received: Mutex<Vec<ReceivedMail>>,
    count: AtomicUsize,
    keep: AtomicBool,
    connections: AtomicUsize,
    arrived: Notify,
    mode: Mode,
    /// TLS handshakes completed / failed.
    tls_sessions: AtomicUsize,
    tls_failures: AtomicUsize,
    commands: Mutex<Vec<SeenCommand>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn take_script(&self, stage: Stage) -> Option<(u16, String)> {
        let mut script = lock(&self.script);
        let i = script.iter().position(|(s, _, _)| *s == stage)?;
        script.remove(i).map(|(_, code, text)| (code, text))
    }

    /// Records one accepted message and returns its sequence number.
    fn accept(&self, mail: Option<ReceivedMail>) -> usize {
        if let Some(mail) = mail {
            lock(&self.received).push(mail);
        }
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        self.arrived.notify_waiters();
        n
    }
}

impl SmtpSink {
    /// Starts a sink on `127.0.0.1` and a free port.
    pub async fn start() -> io::Result<SmtpSink> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a sink on `addr` (port 0 picks a free one). Must be called
    /// within a tokio runtime.
    pub async fn start_on(addr: SocketAddr) -> io::Result<SmtpSink> {
        Self::start_with(addr, Mode::Plain).await
    }

    /// Starts a sink on `127.0.0.1` that advertises `STARTTLS` and, on it,
    /// upgrades the connection with `tls` (RFC 3207). Before that, it serves
    /// in clear like [`SmtpSink::start`].
    pub async fn start_starttls(tls: SinkTls) -> io::Result<SmtpSink> {
        Self::start_with(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Mode::StartTls(tls),
        )
        .await
    }

    /// Starts a sink on `127.0.0.1` that speaks TLS from the first byte
    /// (implicit TLS, `smtps`), presenting `tls`.
    pub async fn start_tls(tls: SinkTls) -> io::Result<SmtpSink> {
        Self::start_with(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Mode::Implicit(tls),
        )
        .await
    }

    async fn start_with(addr: SocketAddr, mode: Mode) -> io::Result<SmtpSink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            script: Mutex::new(VecDeque::new()),
            after_data: Mutex::new(VecDeque::new()),
            auth: Mutex::new(None),
            logins: AtomicUsize::new(0),
            received: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            keep: AtomicBool::new(true),
            connections: AtomicUsize::new(0),
            arrived: Notify::new(),
            mode,
            tls_sessions: AtomicUsize::new(0),
            tls_failures: AtomicUsize::new(0),
            commands: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped));
        debug!(%addr, "smtp sink listening");
        Ok(SmtpSink { addr, shared, stop })
    }

    /// The address the sink listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `smtp://HOST:PORT` (plain), `smtp://HOST:PORT?tls=required`
    /// (STARTTLS) or `smtps://HOST:PORT` (implicit TLS), as the sink serves.
    pub fn url(&self) -> String {
        match self.shared.mode {
            Mode::Plain => format!("smtp://{}", self.addr),
            Mode::StartTls(_) => format!("smtp://{}?tls=required", self.addr),
            Mode::Implicit(_) => format!("smtps://{}", self.addr),
        }
    }

    /// How many TLS handshakes completed (implicit TLS or after `STARTTLS`).
    pub fn tls_sessions(&self) -> usize {
        self.shared.tls_sessions.load(Ordering::SeqCst)
    }

    /// How many TLS handshakes failed (e.g. the client refused the
    /// certificate) or timed out.
    pub fn tls_failures(&self) -> usize {
        self.shared.tls_failures.load(Ordering::SeqCst)
    }

    /// Every command line received so far, in order, across connections
    /// (not recorded while `keep_messages(false)`).
    pub fn commands(&self) -> Vec<SeenCommand> {
        lock(&self.shared.commands).clone()
    }

    /// Queues one reply for the next command of `stage`, e.g.
    /// `script(Stage::Data, 451, "4.3.0 try later")`: the next message is
    /// refused with that reply, and the one after it is accepted. Entries are
    /// consumed in order, across connections.
    ///
    /// A 4xx/5xx on `Mail` refuses the transaction, on `Rcpt` that recipient
    /// (a transaction left without recipients gets 554 on `DATA`), on `Data`
    /// the message, which is then neither stored nor counted. A scripted 2xx
    /// succeeds with the scripted text (on `Data`, the message is accepted).
    ///
    /// # Panics
    /// If `code` is not in `200..=599` (a bug in the calling test).
    pub fn script(&self, stage: Stage, code: u16, text: &str) {
        assert!(
            (200..=599).contains(&code),
            "scripted SMTP reply code must be 200..=599, got {code}"
        );
        let text = text.replace(['\r', '\n'], " ");
        lock(&self.shared.script).push_back((stage, code, text));
    }

    /// Queues what the sink does after the next accepted message (entries
    /// are consumed in order, across connections): the message is stored
    /// and counted (the server has it), then the reply is withheld, the
    /// connection dropped, or the `250` delayed. A message refused by a
    /// scripted [`Stage::Data`] reply does not consume an entry.
    pub fn after_data(&self, action: AfterData) {
        lock(&self.shared.after_data).push_back(action);
    }

    /// Requires `AUTH PLAIN` with these credentials before `MAIL` (advertised
    /// in the `EHLO` reply): `MAIL` without it gets `530`, wrong credentials
    /// `535`. Plain TCP: for tests only.
    pub fn require_auth(&self, user: &str, password: &str) {
        *lock(&self.shared.auth) = Some((user.to_string(), password.to_string()));
    }

    /// How many `AUTH` attempts succeeded.
    pub fn logins(&self) -> usize {
        self.shared.logins.load(Ordering::SeqCst)
    }

    /// The messages accepted so far (empty while `keep_messages(false)`).
    pub fn received(&self) -> Vec<ReceivedMail> {
        lock(&self.shared.received).clone()
    }

    /// How many messages were accepted so far, stored or not.
    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// `false` (benchmark mode): only count accepted messages, don't store
    /// them. Default: `true`.
    pub fn keep_messages(&self, keep: bool) {
        self.shared.keep.store(keep, Ordering::SeqCst);
    }

    /// Waits until at least `n` messages were accepted (by [`count`]), or
    /// until `timeout`, then returns [`received`] as it is.
    ///
    /// [`count`]: SmtpSink::count
    /// [`received`]: SmtpSink::received
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            // Register before checking, so no notification can slip between.
            arrived.as_mut().enable();
            if self.count() >= n {
                break;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                break;
            }
        }
        self.received()
    }

    /// How many TCP connections were accepted in total.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting connections; open connections get `421` and are
    /// closed when they next wait for a command. Idempotent; also on drop.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("addr", &self.addr)
            .field("count", &self.count())
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

/// Resolves once the sink is shut down (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped: that is a shutdown too.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&shared);
                let stop = stop.clone();
                tokio::spawn(async move {
                    match serve_connection(stream, &shared, stop).await {
                        Ok(()) => debug!(%peer, "smtp sink: connection closed"),
                        Err(err) => debug!(%peer, error = %err, "smtp sink: connection lost"),
                    }
                });
            }
            Err(err) => {
                // Out of descriptors and the like: back off, don't spin.
                warn!(error = %err, "smtp sink: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    debug!("smtp sink: stopped accepting");
}

/// What one bounded line read produced.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A whole line, its line end included, is in the buffer.
    Full,
    /// The line was longer than allowed; it was read and thrown away.
    TooLong,
    /// The peer closed the connection (a partial last line is dropped).
    Eof,
}

/// Reads one `\n`-terminated line into `buf` (cleared first), never holding
/// more than `max` bytes of it.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(Line::Eof);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let used = chunk.len();
        if !too_long {
            if buf.len() + used > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        r.consume(used);
        if done {
            return Ok(if too_long { Line::TooLong } else { Line::Full });
        }
    }
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, code: u16, text: &str) -> io::Result<()> {
    let line = if text.is_empty() {
        format!("{code}\r\n")
    } else {
        format!("{code} {text}\r\n")
    };
    w.write_all(line.as_bytes()).await
}

/// Sends the buffered replies unless another complete command is already
/// waiting (pipelining: answer a whole group at once).
async fn flush_if_idle<R, W>(r: &BufReader<R>, w: &mut W) -> io::Result<()>
where
    R: tokio::io::AsyncRead,
    W: AsyncWrite + Unpin,
{
    if !r.buffer().contains(&b'\n') {
        w.flush().await?;
    }
    Ok(())
}

/// Decodes standard base64 (with or without padding); `None` if invalid.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Strips a case-insensitive `FROM:` / `TO:` prefix.
fn strip_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| &arg[keyword.len()..])
}

/// Parses `<path> [params]` (a bare `path` is tolerated) into the address,
/// without a source route, and the parameters.
fn parse_path(rest: &str) -> Option<(String, &str)> {
    let rest = rest.trim_start();
    let (path, params) = if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        (&inner[..end], &inner[end + 1..])
    } else {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        (&rest[..end], &rest[end..])
    };
    // Obsolete source route: <@a,@b:user@c>.
    let path = match path.strip_prefix('@').and_then(|_| path.rfind(':')) {
        Some(colon) => &path[colon + 1..],
        None => path,
    };
    Some((path.to_string(), params))
}

/// The declared `SIZE=` of `MAIL FROM` parameters, if any.
fn declared_size(params: &str) -> Option<u64> {
    params.split_whitespace().find_map(|p| {
        let value = strip_keyword(p, "SIZE=")?;
        value.parse().ok()
    })
}

#[derive(Debug, Default)]
struct Transaction {
    from: String,
    to: Vec<String>,
}

/// The TLS handshake as the server, bounded in time; counted.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    shared: &Shared,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    };
    match &result {
        Ok(_) => shared.tls_sessions.fetch_add(1, Ordering::SeqCst),
        Err(_) => shared.tls_failures.fetch_add(1, Ordering::SeqCst),
    };
    result
}

/// Serves one connection: TLS first if implicit, and the upgrade on
/// `STARTTLS`.
async fn serve_connection(
    stream: TcpStream,
    shared: &Shared,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    match &shared.mode {
        Mode::Implicit(tls) => {
            let stream = handshake(&tls.0, stream, shared).await?;
            serve(stream, true, true, shared, stop).await?;
        }
        Mode::Plain => {
            serve(stream, false, true, shared, stop).await?;
        }
        Mode::StartTls(tls) => {
            if let Some(stream) = serve(stream, false, true, shared, stop.clone()).await? {
                let stream = handshake(&tls.0, stream, shared).await?;
                // No greeting: the client starts over with EHLO.
                serve(stream, true, false, shared, stop).await?;
            }
        }
    }
    Ok(())
}

/// Serves one connection until `QUIT`, disconnect, timeout or shutdown;
/// or, on an accepted `STARTTLS`, hands back the stream to be upgraded.
/// `tls`: the stream is already encrypted. `greet`: send the 220 greeting.
async fn serve<S>(
    stream: S,
    tls: bool,
    greet: bool,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> io::Result<Option<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(16 * 1024, rd);
    let mut w = BufWriter::with_capacity(16 * 1024, wr);
    if greet {
        w.write_all(GREETING).await?;
    }
    let offers_starttls = !tls && matches!(shared.mode, Mode::StartTls(_));

    let mut txn: Option<Transaction> = None;
    let mut authenticated = false;
    let mut line = Vec::with_capacity(256);
    loop {
        flush_if_idle(&r, &mut w).await?;
        let read = tokio::select! {
            biased;
            () = stopped(&mut stop) => {
                reply(&mut w, 421, "4.3.2 sink shutting down").await?;
                w.flush().await?;
                return Ok(None);
            }
            read = tokio::time::timeout(IDLE_TIMEOUT, read_line(&mut r, &mut line, MAX_COMMAND_LINE)) => read,
        };
        let Ok(read) = read else {
            reply(&mut w, 421, "4.4.2 sink idle timeout").await?;
            w.flush().await?;
            return Ok(None);
        };
        match read? {
            Line::Full => {}
            Line::TooLong => {
                reply(&mut w, 500, "5.5.2 line too long").await?;
                continue;
            }
            Line::Eof => {
                debug!("smtp sink: client closed the connection without QUIT");
                return Ok(None);
            }
        }

        let command = String::from_utf8_lossy(trim_line_end(&line));
        let command = command.trim();
        let (verb, arg) = match command.find(' ') {
            Some(i) => (&command[..i], command[i + 1..].trim()),
            None => (command, ""),
        };
        let verb = verb.to_ascii_uppercase();
        if shared.keep.load(Ordering::SeqCst) {
            lock(&shared.commands).push(SeenCommand {
                verb: verb.clone(),
                tls,
            });
        }
        match verb.as_str() {
            "EHLO" | "HELO" if arg.is_empty() => {
                reply(&mut w, 501, "5.5.4 domain name required").await?;
            }
            "EHLO" => {
                txn = None;
                w.write_all(EHLO_NAME).await?;
                if offers_starttls {
                    w.write_all(EHLO_STARTTLS).await?;
                }
                if lock(&shared.auth).is_some() {
                    w.write_all(EHLO_AUTH).await?;
                }
                w.write_all(EHLO_REST).await?;
            }
            "STARTTLS" if offers_starttls => {
                if !arg.is_empty() {
                    reply(&mut w, 501, "5.5.4 no parameters allowed").await?;
                    continue;
                }
                reply(&mut w, 220, "2.0.0 ready to start TLS").await?;
                w.flush().await?;
                // RFC 3207: whatever the client pipelined after STARTTLS is
                // discarded (it was sent in clear), and the session starts
                // over (no transaction, not authenticated).
                let stream = r.into_inner().unsplit(w.into_inner());
                return Ok(Some(stream));
            }
            "STARTTLS" if tls => {
                reply(&mut w, 503, "5.5.1 TLS already active").await?;
            }
            "AUTH" => {
                let required = lock(&shared.auth).clone();
                let mut words = arg.split_whitespace();
                let mechanism = words.next().unwrap_or_default();
                let Some((user, password)) = required else {
                    reply(&mut w, 503, "5.5.1 AUTH not available").await?;
                    continue;
                };
                if !mechanism.eq_ignore_ascii_case("PLAIN") {
                    reply(&mut w, 504, "5.5.4 only AUTH PLAIN").await?;
                    continue;
                }
                let want = format!("\0{user}\0{password}");
                match words.next().and_then(base64_decode) {
                    Some(got) if got == want.as_bytes() => {
                        authenticated = true;
                        shared.logins.fetch_add(1, Ordering::SeqCst);
                        reply(&mut w, 235, "2.7.0 authentication succeeded").await?;
                    }
                    _ => reply(&mut w, 535, "5.7.8 authentication credentials invalid").await?,
                }
            }
            "HELO" => {
                txn = None;
                reply(&mut w, 250, "sink").await?;
            }
            "MAIL" if !authenticated && lock(&shared.auth).is_some() => {
                reply(&mut w, 530, "5.7.0 authentication required").await?;
            }
            "MAIL" => {
                let Some((from, params)) = strip_keyword(arg, "FROM:").and_then(parse_path) else {
                    reply(&mut w, 501, "5.5.4 syntax: MAIL FROM:<address>").await?;
                    continue;
                };
                if txn.is_some() {
                    // RFC 5321 would answer 503; a sink is lenient and
                    // starts over instead.
                    debug!("smtp sink: MAIL inside a transaction, resetting it");
                }
                txn = None;
                if declared_size(params).is_some_and(|size| size > MAX_MESSAGE as u64) {
                    reply(&mut w, 552, "5.3.4 message size exceeds fixed limit").await?;
                    continue;
                }
                match shared.take_script(Stage::Mail) {
                    Some((code, text)) => {
                        if (200..300).contains(&code) {
                            txn = Some(Transaction {
                                from,
                                to: Vec::new(),
                            });
                        }
                        reply(&mut w, code, &text).await?;
                    }
                    None => {
                        txn = Some(Transaction {
                            from,
                            to: Vec::new(),
                        });
                        reply(&mut w, 250, "2.1.0 OK").await?;
                    }
                }
            }
            "RCPT" => {
                let Some(t) = txn.as_mut() else {
                    reply(&mut w, 503, "5.5.1 need MAIL before RCPT").await?;
                    continue;
                };
                let Some((to, _)) = strip_keyword(arg, "TO:")
                    .and_then(parse_path)
                    .filter(|(to, _)| !to.is_empty())
                else {
                    reply(&mut w, 501, "5.5.4 syntax: RCPT TO:<address>").await?;
                    continue;
                };
                if t.to.len() >= MAX_RECIPIENTS {
                    reply(&mut w, 452, "4.5.3 too many recipients").await?;
                    continue;
                }
                match shared.take_script(Stage::Rcpt) {
                    Some((code, text)) => {
                        if (200..300).contains(&code) {
                            t.to.push(to);
                        }
                        reply(&mut w, code, &text).await?;
                    }
                    None => {
                        t.to.push(to);
                        reply(&mut w, 250, "2.1.5 OK").await?;
                    }
                }
            }
            "DATA" => {
                let Some(t) = txn.take() else {
                    reply(&mut w, 503, "5.5.1 need MAIL before DATA").await?;
                    continue;
                };
                if t.to.is_empty() {
                    reply(&mut w, 554, "5.5.1 no valid recipients").await?;
                    txn = Some(t);
                    continue;
                }
                reply(&mut w, 354, "end data with <CR><LF>.<CR><LF>").await?;
                w.flush().await?;
                let keep = shared.keep.load(Ordering::SeqCst);
                let Some(body) = read_data(&mut r, &mut line, keep).await? else {
                    debug!("smtp sink: client went away during DATA");
                    return Ok(None);
                };
                let Ok(body) = body else {
                    reply(&mut w, 552, "5.3.4 message too big or line too long").await?;
                    continue;
                };
                let mail = keep.then(|| ReceivedMail {
                    from: t.from,
                    to: t.to,
                    data: String::from_utf8_lossy(&body).into_owned(),
                    tls,
                });
                match shared.take_script(Stage::Data) {
                    Some((code, text)) => {
                        if (200..300).contains(&code) {
                            shared.accept(mail);
                        }
                        reply(&mut w, code, &text).await?;
                    }
                    None => {
                        let n = shared.accept(mail);
                        let after = lock(&shared.after_data).pop_front();
                        match after {
                            None => {}
                            Some(AfterData::Drop) => {
                                debug!("smtp sink: dropping the connection after taking a message");
                                return Ok(None);
                            }
                            Some(AfterData::Stall) => {
                                debug!("smtp sink: stalling after taking a message");
                                // Read (and ignore) whatever comes until the
                                // client gives up or the sink stops.
                                loop {
                                    let read = tokio::select! {
                                        biased;
                                        () = stopped(&mut stop) => return Ok(None),
                                        read = read_line(&mut r, &mut line, MAX_COMMAND_LINE) => read,
                                    };
                                    if matches!(read, Ok(Line::Eof) | Err(_)) {
                                        return Ok(None);
                                    }
                                }
                            }
                            Some(AfterData::Delay(d)) => {
                                tokio::select! {
                                    biased;
                                    () = stopped(&mut stop) => return Ok(None),
                                    () = tokio::time::sleep(d) => {}
                                }
                            }
                        }
                        reply(&mut w, 250, &format!("2.0.0 queued as {n}")).await?;
                    }
                }
            }
            "RSET" => {
                txn = None;
                reply(&mut w, 250, "2.0.0 OK").await?;
            }
            "NOOP" => reply(&mut w, 250, "2.0.0 OK").await?,
            "QUIT" => {
                reply(&mut w, 221, "2.0.0 bye").await?;
                w.flush().await?;
                let _ = w.shutdown().await;
                return Ok(None);
            }
            _ => reply(&mut w, 500, "5.5.2 command not recognized").await?,
        }
    }
}

/// Reads a message up to its lone `.` line, undoing dot-stuffing.
/// `None`: the peer closed or went silent; `Some(Err(()))`: too big (the
/// rest was read and discarded); `Some(Ok(body))`, body empty unless `keep`.
async fn read_data<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    keep: bool,
) -> io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut body = Vec::new();
    let mut size = 0usize;
    let mut too_big = false;
    loop {
        let Ok(read) = tokio::time::timeout(IDLE_TIMEOUT, read_line(r, line, MAX_DATA_LINE)).await
        else {
            return Ok(None);
        };
        match read? {
            Line::Eof => return Ok(None),
            Line::TooLong => {
                too_big = true;
                body = Vec::new();
                continue;
            }
            Line::Full => {}
        }
        if trim_line_end(line) == b"." {
            break;
        }
        let content = line.strip_prefix(b".").unwrap_or(line);
        size += content.len();
        if size > MAX_MESSAGE && !too_big {
            too_big = true;
            body = Vec::new();
        }
        if keep && !too_big {
            body.extend_from_slice(content);
        }
    }
    Ok(Some(if too_big { Err(()) } else { Ok(body) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use lettre::message::Mailbox;
    use lettre::transport::smtp::PoolConfig;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    use tokio::io::AsyncReadExt;
    use tokio::task::JoinSet;

    const WAIT: Duration = Duration::from_secs(10);

    fn transport(sink: &SmtpSink) -> AsyncSmtpTransport<Tokio1Executor> {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(sink.addr().port())
            .build()
    }

    fn message(to: &str, subject: &str, body: &str) -> Message {
        let from: Mailbox = "Prereg <noreply@example.com>".parse().expect("from");
        let to: Mailbox = to.parse().expect("to");
        Message::builder()
            .from(from)
            .to(to)
            .subject(subject)
            .body(body.to_string())
            .expect("message")
    }

    /// A raw client for what lettre won't do (pipelining, bad input).
    struct Raw {
        r: BufReader<tokio::net::tcp::OwnedReadHalf>,
        w: tokio::net::tcp::OwnedWriteHalf,
    }

    impl Raw {
        async fn connect(sink: &SmtpSink) -> Raw {
            let stream = TcpStream::connect(sink.addr()).await.expect("connect");
            let (r, w) = stream.into_split();
            let mut raw = Raw {
                r: BufReader::new(r),
                w,
            };
            assert_eq!(raw.reply().await, "220 sink ESMTP");
            raw
        }

        async fn send(&mut self, bytes: &str) {
            self.w.write_all(bytes.as_bytes()).await.expect("write");
        }

        /// One (possibly multi-line) reply, lines joined by '\n'.
        async fn reply(&mut self) -> String {
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                let n = tokio::time::timeout(WAIT, self.r.read_line(&mut line))
                    .await
                    .expect("reply in time")
                    .expect("read");
                assert!(n > 0, "connection closed, got so far: {lines:?}");
                let line = line.trim_end_matches(['\r', '\n']).to_string();
                let last = line.as_bytes().get(3) != Some(&b'-');
                lines.push(line);
                if last {
                    return lines.join("\n");
                }
            }
        }
    }

    #[tokio::test]
    async fn one_message_arrives_with_envelope_and_body() {
        let sink = SmtpSink::start().await.expect("start");
        assert_eq!(
            sink.url(),
            format!("smtp://127.0.0.1:{}", sink.addr().port())
        );
        transport(&sink)
            .send(message(
                "Ann <ann@example.org>",
                "Welcome",
                "Hello Ann,\r\nsee you.\r\n",
            ))
            .await
            .expect("send");
        let got = sink.wait_for(1, WAIT).await;
        assert_eq!(got.len(), 1);
        assert_eq!(sink.count(), 1);
        assert_eq!(got[0].from, "noreply@example.com");
        assert_eq!(got[0].to, vec!["ann@example.org".to_string()]);
        assert!(
            got[0].data.contains("Subject: Welcome\r\n"),
            "{}",
            got[0].data
        );
        assert!(
            got[0].data.contains("\r\n\r\nHello Ann,\r\nsee you.\r\n"),
            "{}",
            got[0].data
        );
        assert!(!got[0].data.ends_with("\r\n.\r\n"));
    }

    #[tokio::test]
    async fn scripted_451_on_data_is_transient_then_next_succeeds() {
        let sink = SmtpSink::start().await.expect("start");
        sink.script(Stage::Data, 451, "4.3.0 try later");
        let t = transport(&sink);
        let err = t
            .send(message("bob@example.org", "first", "try 1"))
            .await
            .expect_err("scripted 451");
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("try later"), "{err}");
        assert_eq!(sink.count(), 0);

        t.send(message("bob@example.org", "second", "try 2"))
            .await
            .expect("second send");
        let got = sink.wait_for(1, WAIT).await;
        assert_eq!(got.len(), 1);
        assert_eq!(sink.count(), 1);
        assert!(got[0].data.contains("try 2"));
    }

    #[tokio::test]
    async fn scripted_550_on_rcpt_is_permanent_with_its_text() {
        let sink = SmtpSink::start().await.expect("start");
        sink.script(Stage::Rcpt, 550, "5.1.1 no such user here");
        let t = transport(&sink);
        let err = t
            .send(message("nobody@example.org", "hi", "x"))
            .await
            .expect_err("scripted 550");
        assert!(err.is_permanent(), "{err:?}");
        assert!(err.to_string().contains("no such user here"), "{err}");
        assert_eq!(sink.count(), 0);
        assert!(sink.received().is_empty());

        // The script is used up: the next one goes through.
        t.send(message("somebody@example.org", "hi", "y"))
            .await
            .expect("send");
        assert_eq!(sink.wait_for(1, WAIT).await.len(), 1);
    }

    #[tokio::test]
    async fn scripted_mail_rejection_and_script_order() {
        let sink = SmtpSink::start().await.expect("start");
        sink.script(Stage::Mail, 421, "4.7.0 slow down");
        sink.script(Stage::Mail, 553, "5.7.1 sender refused");
        let t = transport(&sink);
        let err = t
            .send(message("a@example.org", "1", "1"))
            .await
            .expect_err("421");
        assert!(err.is_transient(), "{err:?}");
        let err = t
            .send(message("a@example.org", "2", "2"))
            .await
            .expect_err("553");
        assert!(err.is_permanent(), "{err:?}");
        assert!(err.to_string().contains("sender refused"), "{err}");
        t.send(message("a@example.org", "3", "3"))
            .await
            .expect("third");
        assert_eq!(sink.wait_for(1, WAIT).await.len(), 1);
    }

    #[tokio::test]
    async fn two_hundred_messages_through_a_pool_of_eight() {
        let sink = SmtpSink::start().await.expect("start");
        let t = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(sink.addr().port())
            .pool_config(PoolConfig::new().max_size(8))
            .build();
        // lettre's max_size bounds the parked connections, not the ones in
        // use, so keep 8 sends in flight (8 workers). A used connection goes
        // back to the pool on a spawned task: yield so it is parked before
        // the worker asks for the next one (this runtime is single-threaded).
        let mut workers = JoinSet::new();
        for worker in 0..8 {
            let t = t.clone();
            workers.spawn(async move {
                for i in 0..25 {
                    let n = worker * 25 + i;
                    let to = format!("user{n}@example.org");
                    t.send(message(&to, &format!("msg {n}"), &format!("body {n}")))
                        .await
                        .expect("send");
                    tokio::task::yield_now().await;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.expect("worker");
        }
        let got = sink.wait_for(200, WAIT).await;
        assert_eq!(got.len(), 200);
        assert_eq!(sink.count(), 200);
        let mut subjects: Vec<usize> = got
            .iter()
            .map(|m| {
                let line = m
                    .data
                    .lines()
                    .find(|l| l.starts_with("Subject: msg "))
                    .expect("subject");
                line["Subject: msg ".len()..].parse().expect("number")
            })
            .collect();
        subjects.sort_unstable();
        assert_eq!(subjects, (0..200).collect::<Vec<_>>());
        let connections = sink.connections();
        assert!((1..=8).contains(&connections), "{connections} connections");
    }

    #[tokio::test]
    async fn dot_stuffing_round_trip() {
        let sink = SmtpSink::start().await.expect("start");
        let body = "first\r\n.leading dot\r\n.\r\n..two dots\r\nlast\r\n";
        transport(&sink)
            .send(message("dot@example.org", "dots", body))
            .await
            .expect("send");
        let got = sink.wait_for(1, WAIT).await;
        assert_eq!(got.len(), 1);
        // lettre always ends with "\r\n.\r\n", even after a final CRLF.
        assert!(
            got[0].data.contains(&format!("\r\n\r\n{body}")),
            "{:?}",
            got[0].data
        );
    }

    #[tokio::test]
    async fn pipelined_commands_in_one_packet() {
        let sink = SmtpSink::start().await.expect("start");
        let mut c = Raw::connect(&sink).await;
        c.send("EHLO client\r\n").await;
        assert_eq!(
            c.reply().await,
            "250-sink\n250-PIPELINING\n250-8BITMIME\n250 SIZE 10485760"
        );
        c.send("MAIL FROM:<a@x> BODY=8BITMIME\r\nRCPT TO:<b@y>\r\nrcpt to:<c@z>\r\nDATA\r\n")
            .await;
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("354 "));
        c.send("Subject: s\r\n\r\n..x\r\n.\r\nNOOP\r\nMAIL FROM:<>\r\nRSET\r\nQUIT\r\n")
            .await;
        assert_eq!(c.reply().await, "250 2.0.0 queued as 1");
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("221 "));
        let mut rest = Vec::new();
        c.r.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty());
        assert_eq!(
            sink.received(),
            vec![ReceivedMail {
                from: "a@x".into(),
                to: vec!["b@y".into(), "c@z".into()],
                data: "Subject: s\r\n\r\n.x\r\n".into(),
                tls: false,
            }]
        );
    }

    #[tokio::test]
    async fn bad_sequences_unknown_and_overlong_lines() {
        let sink = SmtpSink::start().await.expect("start");
        let mut c = Raw::connect(&sink).await;
        c.send("HELO client\r\n").await;
        assert_eq!(c.reply().await, "250 sink");
        c.send("STARTTLS\r\n").await;
        assert!(c.reply().await.starts_with("500 "));
        c.send("RCPT TO:<b@y>\r\n").await;
        assert!(c.reply().await.starts_with("503 "));
        c.send("DATA\r\n").await;
        assert!(c.reply().await.starts_with("503 "));
        c.send("MAIL FROM:<a@x\r\n").await;
        assert!(c.reply().await.starts_with("501 "));
        c.send(&format!("NOOP {}\r\n", "x".repeat(3 * MAX_COMMAND_LINE)))
            .await;
        assert!(c.reply().await.starts_with("500 "));
        c.send("MAIL FROM:<a@x> SIZE=999999999\r\n").await;
        assert!(c.reply().await.starts_with("552 "));
        c.send("MAIL FROM:<a@x>\r\nDATA\r\n").await;
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("554 "));
        c.send("RSET\r\nNOOP\r\n").await;
        assert!(c.reply().await.starts_with("250 "));
        assert!(c.reply().await.starts_with("250 "));
        assert_eq!(sink.count(), 0);
    }

    #[tokio::test]
    async fn abrupt_disconnects_do_not_hurt() {
        let sink = SmtpSink::start().await.expect("start");
        {
            // Gone mid-DATA.
            let mut c = Raw::connect(&sink).await;
            c.send("EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
                .await;
            for _ in 0..4 {
                c.reply().await;
            }
            c.send("Subject: half\r\n\r\npartial line without end")
                .await;
        }
        {
            // Gone mid-command, and right after connecting.
            let mut c = Raw::connect(&sink).await;
            c.send("MAIL FROM:<a").await;
        }
        drop(TcpStream::connect(sink.addr()).await.expect("connect"));
        // The sink still serves.
        transport(&sink)
            .send(message("x@example.org", "after", "still here"))
            .await
            .expect("send");
        let got = sink.wait_for(1, WAIT).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].data.contains("still here"));
        assert_eq!(sink.connections(), 4);
    }

    #[tokio::test]
    async fn benchmark_mode_counts_without_storing() {
        let sink = SmtpSink::start().await.expect("start");
        sink.keep_messages(false);
        let t = transport(&sink);
        for i in 0..3 {
            t.send(message("x@example.org", "b", &format!("n{i}")))
                .await
                .expect("send");
        }
        assert!(sink.wait_for(3, WAIT).await.is_empty());
        assert_eq!(sink.count(), 3);
        sink.keep_messages(true);
        t.send(message("x@example.org", "b", "kept"))
            .await
            .expect("send");
        assert_eq!(sink.wait_for(4, WAIT).await.len(), 1);
        assert_eq!(sink.count(), 4);
    }

    #[tokio::test]
    async fn wait_for_times_out_with_what_it_has() {
        let sink = SmtpSink::start().await.expect("start");
        let started = std::time::Instant::now();
        let got = sink.wait_for(1, Duration::from_millis(100)).await;
        assert!(got.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_stops_accepting() {
        let sink = SmtpSink::start().await.expect("start");
        let addr = sink.addr();
        let mut c = Raw::connect(&sink).await;
        sink.shutdown();
        assert!(c.reply().await.starts_with("421 "));
        // The listener is gone once the accept loop has seen the signal.
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "still accepting after shutdown");
        drop(sink);
    }

    #[tokio::test]
    async fn start_on_a_given_address() {
        let sink = SmtpSink::start_on("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("start");
        assert!(sink.addr().port() != 0);
        let mut c = Raw::connect(&sink).await;
        c.send("QUIT\r\n").await;
        assert_eq!(c.reply().await, "221 2.0.0 bye");
    }

    #[tokio::test]
    async fn read_line_is_bounded() {
        let mut input: &[u8] = b"short\r\nthis one is far too long\r\nok\nno end";
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut input, &mut buf, 10).await.expect("r"),
            Line::Full
        );
        assert_eq!(buf, b"short\r\n");
        assert_eq!(
            read_line(&mut input, &mut buf, 10).await.expect("r"),
            Line::TooLong
        );
        assert_eq!(
            read_line(&mut input, &mut buf, 10).await.expect("r"),
            Line::Full
        );
        assert_eq!(buf, b"ok\n");
        assert_eq!(
            read_line(&mut input, &mut buf, 10).await.expect("r"),
            Line::Eof
        );
    }

    #[test]
    fn paths_and_params() {
        assert_eq!(
            parse_path("<a@b> SIZE=10"),
            Some(("a@b".into(), " SIZE=10"))
        );
        assert_eq!(parse_path("<>"), Some((String::new(), "")));
        assert_eq!(parse_path("a@b"), Some(("a@b".into(), "")));
        assert_eq!(parse_path("<@r1,@r2:u@d>"), Some(("u@d".into(), "")));
        assert_eq!(parse_path("<a@b"), None);
        assert_eq!(strip_keyword("from:<x>", "FROM:"), Some("<x>"));
        assert_eq!(strip_keyword("FR", "FROM:"), None);
        assert_eq!(strip_keyword("FRé:", "FROM:"), None);
        assert_eq!(declared_size(" BODY=8BITMIME size=42"), Some(42));
        assert_eq!(declared_size(" SIZE=x"), None);
    }

    /// Sends one message up to its terminating dot on a raw connection.
    async fn raw_message(sink: &SmtpSink) -> Raw {
        let mut c = Raw::connect(sink).await;
        c.send("EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
            .await;
        for _ in 0..4 {
            c.reply().await;
        }
        c.send("Subject: s\r\n\r\nbody\r\n.\r\n").await;
        c
    }

    #[tokio::test]
    async fn after_data_actions_take_the_message_then_drop_stall_or_delay_the_reply() {
        let sink = SmtpSink::start().await.expect("start");
        sink.after_data(AfterData::Drop);
        sink.after_data(AfterData::Stall);
        sink.after_data(AfterData::Delay(Duration::from_millis(300)));
        // Drop: the message is taken, then the connection closes unanswered.
        let mut c = raw_message(&sink).await;
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, c.r.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .expect("eof");
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert_eq!(sink.count(), 1);
        // Stall: taken, and no answer comes.
        let mut c = raw_message(&sink).await;
        sink.wait_for(2, WAIT).await;
        assert_eq!(sink.count(), 2);
        let mut line = String::new();
        assert!(
            tokio::time::timeout(Duration::from_millis(400), c.r.read_line(&mut line))
                .await
                .is_err(),
            "a stalled sink answered: {line:?}"
        );
        drop(c);
        // Delay: the 250 comes, late.
        let started = tokio::time::Instant::now();
        let mut c = raw_message(&sink).await;
        assert_eq!(c.reply().await, "250 2.0.0 queued as 3");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // The queue is used up: the next message is answered at once.
        c.send("MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n").await;
        for _ in 0..3 {
            c.reply().await;
        }
        c.send("x\r\n.\r\n").await;
        assert_eq!(c.reply().await, "250 2.0.0 queued as 4");
        assert_eq!(sink.received().len(), 4);
    }

    #[test]
    fn base64_decodes_what_clients_send() {
        assert_eq!(base64_decode("AHVzZXIAcGFzcw==").unwrap(), b"\0user\0pass");
        assert_eq!(base64_decode("AHVzZXIAcGFzcw").unwrap(), b"\0user\0pass");
        assert!(base64_decode("not base64!").is_none());
    }

    #[tokio::test]
    async fn auth_plain_is_required_when_asked_for() {
        let sink = SmtpSink::start().await.expect("start");
        sink.require_auth("user", "pass");
        let mut c = Raw::connect(&sink).await;
        c.send("EHLO c\r\n").await;
        assert!(c.reply().await.starts_with("250-sink\n250-AUTH PLAIN\n"));
        c.send("MAIL FROM:<a@x>\r\n").await;
        assert!(c.reply().await.starts_with("530 "));
        c.send("AUTH PLAIN AHVzZXIAd3Jvbmc=\r\n").await;
        assert!(c.reply().await.starts_with("535 "));
        c.send("AUTH PLAIN AHVzZXIAcGFzcw==\r\n").await;
        assert!(c.reply().await.starts_with("235 "));
        assert_eq!(sink.logins(), 1);
        // lettre authenticates the same way.
        let t = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(sink.addr().port())
            .credentials(lettre::transport::smtp::authentication::Credentials::new(
                "user".into(),
                "pass".into(),
            ))
            .build();
        t.send(message("bob@example.org", "authed", "hi"))
            .await
            .expect("sent with AUTH");
        assert_eq!(sink.count(), 1);
        assert_eq!(sink.logins(), 2);
    }
}
