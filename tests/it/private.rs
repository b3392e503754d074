//! Private Postgres, Redis and RabbitMQ instances for fault tests: each on
//! free ports, with its data under a temporary directory, faulted only by the
//! test that owns it and stopped (process group killed, directory removed)
//! when its guard drops, even if the test fails. The machine's shared
//! services are never touched.

// Each test uses some of these helpers.
#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use uuid::Uuid;

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn wait_port(port: u16, open: bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if port_open(port) == open {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "prereg-{what}-{}",
            &Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills a child's whole process group (it was started as its own group).
fn kill_group(child: &mut Child, signal: i32) {
    unsafe {
        libc::kill(-(child.id() as i32), signal);
    }
    let _ = child.wait();
}

/// SIGKILLs the process group of a private server (if running) and waits
/// at most `limit` for its `port` to close.
fn sigkill(child: &mut Option<Child>, port: u16, limit: Duration) {
    if let Some(mut c) = child.take() {
        kill_group(&mut c, libc::SIGKILL);
    }
    wait_port(port, false, limit);
}

fn own_group(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------- Postgres

/// A private PostgreSQL cluster (initdb + pg_ctl), run as `postgres` when
/// the tests run as root.
pub struct PrivatePg {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    _dir: TempDir,
}

fn pg_bin() -> Option<PathBuf> {
    if let Ok(b) = std::env::var("PREREG_TEST_PG_BIN") {
        return Some(PathBuf::from(b));
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

impl PrivatePg {
    /// Starts a fresh cluster; `None` (with the reason printed) when the
    /// PostgreSQL server binaries are not installed.
    pub fn start() -> Option<PrivatePg> {
        let Some(bin) = pg_bin() else {
            eprintln!("SKIPPED: no PostgreSQL server binaries under /usr/lib/postgresql");
            return None;
        };
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
        }
        let pg = PrivatePg {
            port: free_port(),
            bin,
            data,
            _dir: dir,
        };
        let out = pg
            .run("initdb", &["-U", "postgres", "--auth=trust", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_again();
        Some(pg)
    }

    /// `tool` of the server's binaries on its data directory (`-D`), then `args`.
    fn run(&self, tool: &str, args: &[&str]) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.arg("-D")
            .arg(&self.data)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server and waits until it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=60 -c shared_buffers=16MB",
            self.port,
            self.data.display()
        );
        let log = self.data.join("server.log");
        let status = self
            .run(
                "pg_ctl",
                &[
                    "-o",
                    &opts,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl start");
        assert!(status.success(), "pg_ctl start failed (see {log:?})");
        assert!(wait_port(self.port, true, Duration::from_secs(30)));
    }

    /// Stops the server: `fast` terminates sessions ("terminating connection
    /// due to administrator command"), `immediate` is a crash.
    pub fn stop(&self, mode: &str) {
        let _ = self
            .run("pg_ctl", &["-m", mode, "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}

// ------------------------------------------------------------------- Redis

/// A private `redis-server` without persistence.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl PrivateRedis {
    pub fn start() -> Option<PrivateRedis> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        }
        let mut r = PrivateRedis {
            port: free_port(),
            child: None,
            dir: TempDir::new("redis"),
        };
        r.start_again();
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        let child = own_group(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .expect("redis-server starts");
        self.child = Some(child);
        assert!(wait_port(self.port, true, Duration::from_secs(10)));
    }

    /// SIGKILL: every key is gone.
    pub fn kill(&mut self) {
        sigkill(&mut self.child, self.port, Duration::from_secs(5));
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- RabbitMQ

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

/// One private RabbitMQ node (own node name, ports, data, config, cookie
/// home; no plugins, so nothing binds the shared broker's management port).
pub struct PrivateRabbit {
    pub node: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    home: PathBuf,
    child: Option<Child>,
}

impl PrivateRabbit {
    /// Starts a node under `home` (shared by the nodes of one cluster: same
    /// Erlang cookie). `None` when RabbitMQ is not installed.
    pub fn start_in(home: &Path, name: &str) -> Option<PrivateRabbit> {
        if !Path::new(RABBIT_BIN).join("rabbitmq-server").exists() {
            eprintln!("SKIPPED: RabbitMQ is not installed ({RABBIT_BIN})");
            return None;
        }
        let dir = home.join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        std::fs::write(dir.join("rabbitmq.conf"), "loopback_users.guest = false\n").unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.join("env.conf"), "ERL_EPMD_ADDRESS=127.0.0.1\n").unwrap();
        let mut r = PrivateRabbit {
            node: format!("{name}@localhost"),
            port: free_port(),
            dist_port: free_port(),
            dir,
            home: home.to_path_buf(),
            child: None,
        };
        if !r.start_again() {
            eprintln!("SKIPPED: private RabbitMQ node {} did not start", r.node);
            return None;
        }
        Some(r)
    }

    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.env("HOME", &self.home)
            .env("RABBITMQ_CONF_ENV_FILE", d.join("env.conf"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"));
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node and waits (up to 90 s) for its AMQP port.
    pub fn start_again(&mut self) -> bool {
        let mut cmd = Command::new(Path::new(RABBIT_BIN).join("rabbitmq-server"));
        self.env(&mut cmd);
        let log = std::fs::File::create(self.dir.join("server.out")).unwrap();
        let child = own_group(
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
        .spawn()
        .expect("rabbitmq-server starts");
        self.child = Some(child);
        wait_port(self.port, true, Duration::from_secs(90))
    }

    /// Runs `rabbitmqctl -n <node> args…`.
    pub fn ctl(&self, args: &[&str]) -> bool {
        let mut cmd = Command::new(Path::new(RABBIT_BIN).join("rabbitmqctl"));
        self.env(&mut cmd);
        let out = cmd
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("rabbitmqctl runs");
        if !out.status.success() {
            eprintln!(
                "rabbitmqctl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    /// Kills the node (SIGKILL of its process group).
    pub fn kill(&mut self) {
        sigkill(&mut self.child, self.port, Duration::from_secs(10));
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child process (e.g. `prereg worker`) killed with its group on drop.
pub struct ChildProc(pub Option<Child>);

impl ChildProc {
    pub fn spawn(cmd: &mut Command) -> ChildProc {
        ChildProc(Some(own_group(cmd).spawn().expect("child starts")))
    }
    pub fn pid(&self) -> i32 {
        self.0.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            kill_group(&mut c, libc::SIGKILL);
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}
