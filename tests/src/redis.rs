//! A real `redis-server` on a free loopback port, killed when the test ends.
//!
//! No persistence (`--save "" --appendonly no`), so each server starts empty. `pause`/`resume`
//! (SIGSTOP/SIGCONT) let reliability tests freeze Redis with its sockets still open, the nastiest
//! kind of outage for a client: connections stay up and replies never come.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, free_port};

/// A running redis-server; dropping it kills the process.
#[derive(Debug)]
pub struct RedisServer {
    guard: ChildGuard,
    port: u16,
    tls: Option<TlsRedis>,
}

/// The TLS side of a server started with [`RedisServer::start_tls`].
#[derive(Debug)]
pub struct TlsRedis {
    port: u16,
    dir: tempfile::TempDir,
}

/// The ACL user [`RedisServer::start_tls`] creates (the `default` user is switched off).
pub const TLS_USER: &str = "llmwarden";
/// Its password.
pub const TLS_PASSWORD: &str = "test-only-redis-pw-5b1e";

/// Where redis-server is: `$LLMWARDEN_REDIS_SERVER`, else the first `redis-server` on `PATH`, else
/// /usr/bin/redis-server. Panics with the fix when none exists.
#[must_use]
pub fn redis_server_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LLMWARDEN_REDIS_SERVER") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file());
    let p = on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"));
    assert!(
        p.is_file(),
        "redis-server is not installed (looked on PATH and at /usr/bin/redis-server); run `cargo xtask setup` \
         (it installs the redis-server package), or set LLMWARDEN_REDIS_SERVER to its path"
    );
    p
}

impl RedisServer {
    /// Starts a server on a free port of 127.0.0.1 and waits until it answers PING (10 s at most).
    ///
    /// # Panics
    /// When redis-server is missing (with the fix: `cargo xtask setup`) or does not come up.
    #[must_use]
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra `redis-server` arguments (e.g. `["--cluster-enabled", "yes"]`).
    #[must_use]
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let bin = redis_server_path();
        // A port can be taken between free_port() and the bind; retry a few times.
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                "--loglevel",
                "warning",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            let mut guard = ChildGuard::spawn("redis-server", &mut cmd);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !guard.is_running() {
                    break;
                }
                if ping(port) {
                    return RedisServer {
                        guard,
                        port,
                        tls: None,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            guard.kill();
        }
        panic!(
            "redis-server ({}) did not answer PING on a free loopback port after 5 attempts",
            bin.display()
        );
    }

    /// A server that also listens with TLS on a second loopback port, its certificate signed by a
    /// fresh CA ([`RedisServer::ca_path`]), clients not asked for certificates. The ACL user
    /// [`TLS_USER`] / [`TLS_PASSWORD`] has the ACL docs/security.md recommends; the `default` user is switched off, so
    /// every connection must authenticate (and [`RedisServer::command`] no longer works).
    ///
    /// # Panics
    /// When the certificates cannot be made or the server does not come up.
    #[must_use]
    pub fn start_tls() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir for redis TLS files");
        write_tls_files(dir.path());
        let tls_port = free_port();
        let p = |f: &str| dir.path().join(f).display().to_string();
        let (cert, key, ca) = (p("server.pem"), p("server.key"), p("ca.pem"));
        let mut server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ]);
        let created = server.command(&[
            "ACL",
            "SETUSER",
            TLS_USER,
            "on",
            &format!(">{TLS_PASSWORD}"),
            // The ACL docs/security.md gives the llmwarden user: its own keys, no dangerous or
            // admin commands, no Pub/Sub channels.
            "~llmw:*",
            "resetchannels",
            "+@all",
            "-@dangerous",
        ]);
        assert_eq!(created, "+OK", "ACL SETUSER {TLS_USER}");
        assert_eq!(server.command(&["ACL", "SETUSER", "default", "off"]), "+OK");
        server.tls = Some(TlsRedis {
            port: tls_port,
            dir,
        });
        server
    }

    /// `rediss://llmwarden@127.0.0.1:<tls port>` (no password: it comes from the environment).
    ///
    /// # Panics
    /// When the server was not started with [`RedisServer::start_tls`].
    #[must_use]
    pub fn tls_url(&self) -> String {
        let tls = self.tls.as_ref().expect("a server from start_tls");
        format!("rediss://{TLS_USER}@127.0.0.1:{}", tls.port)
    }

    /// The PEM file of the CA that signed the TLS certificate.
    ///
    /// # Panics
    /// When the server was not started with [`RedisServer::start_tls`].
    #[must_use]
    pub fn ca_path(&self) -> PathBuf {
        let tls = self.tls.as_ref().expect("a server from start_tls");
        tls.dir.path().join("ca.pem")
    }

    /// The port it listens on (127.0.0.1).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.guard.signal(libc::SIGSTOP);
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.guard.signal(libc::SIGCONT);
    }

    /// Kills the server now (a crash, not a shutdown).
    pub fn kill(&mut self) {
        // A stopped process still dies of SIGKILL.
        self.guard.kill();
    }

    /// Runs one command given as words over a fresh blocking connection and returns the raw RESP
    /// reply (for quick checks from synchronous code; tests normally use the `redis` crate).
    ///
    /// # Panics
    /// When the server cannot be reached within 5 s.
    #[must_use]
    pub fn command(&self, words: &[&str]) -> String {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to redis at {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set_read_timeout");
        let mut req = format!("*{}\r\n", words.len());
        for w in words {
            req.push_str(&format!("${}\r\n{w}\r\n", w.len()));
        }
        s.write_all(req.as_bytes()).expect("write to redis");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("read from redis");
        if let Some(n) = line
            .strip_prefix('$')
            .and_then(|n| n.trim().parse::<usize>().ok())
        {
            let mut body = vec![0; n + 2];
            r.read_exact(&mut body).expect("read bulk reply");
            return String::from_utf8_lossy(&body[..n]).into_owned();
        }
        line.trim_end().to_owned()
    }
}

/// A CA and a server certificate for 127.0.0.1 / localhost in `dir`: ca.pem, server.pem,
/// server.key.
fn write_tls_files(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "llmwarden test redis CA");
    let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params")
        .signed_by(&key, &issuer)
        .expect("sign server certificate");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
    std::fs::write(dir.join("server.pem"), leaf.pem()).expect("write server.pem");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write server.key");
}

/// Whether something answers `+PONG` on 127.0.0.1:`port` within 200 ms.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A Redis Cluster of `n` primaries (no replicas) on free loopback ports, created with
/// `redis-cli --cluster create`; dropping it kills every node and removes their config files.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts `n` (at least 3) cluster-enabled nodes and joins them; waits until the cluster is ok.
    ///
    /// # Panics
    /// When redis-server or redis-cli is missing (fix: `cargo xtask setup`) or the cluster does not form.
    #[must_use]
    pub fn start(n: usize) -> RedisCluster {
        assert!(n >= 3, "Redis Cluster needs at least 3 primaries");
        let dir = std::env::temp_dir().join(format!(
            "llmw-redis-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let d = dir.to_string_lossy().into_owned();
        let nodes: Vec<RedisServer> = (0..n)
            .map(|i| {
                let conf = format!("nodes-{i}.conf");
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--dir",
                    &d,
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let cli = redis_server_path().with_file_name("redis-cli");
        assert!(
            cli.is_file(),
            "{} is missing; run `cargo xtask setup` (redis-tools)",
            cli.display()
        );
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        let out = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", cli.display()));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while !nodes
            .iter()
            .all(|s| s.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes, dir }
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`.
    #[must_use]
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The nodes.
    #[must_use]
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
