//! Observer discovery with processes the host's paths do not describe (issue 21): a Python
//! `openai` client chrooted into a private root that carries its own libssl copy (another inode),
//! in new pid + mount namespaces, short-lived; and a process whose libssl was replaced on disk
//! after it started (deleted but still mapped). Each must be billed to the exact nano-USD.
//!
//! Needs root (eBPF, mounts, chroot). Fails — never skips — when not root.

use std::io::BufRead as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llmwarden_tests::mock::{MockConfig, MockProvider};
use llmwarden_tests::observer::{Observer, assert_ledger, billed, require_root};
use llmwarden_tests::redis::RedisServer;

/// One observer at a time: each attaches host-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// The host's multiarch library directory (Debian, merged /usr).
const LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where the venv's interpreter and libraries live on the host.
struct PythonLayout {
    /// The real interpreter binary (the venv's `bin/python` resolved).
    interpreter: PathBuf,
    /// The standard library directory (`.../lib/python3.X`).
    stdlib: PathBuf,
    /// The venv's site-packages (the SDKs).
    site_packages: PathBuf,
}

fn python_layout() -> PythonLayout {
    let out = Command::new(llmwarden_tests::python::venv_python())
        .args([
            "-c",
            "import os, sys, sysconfig; p = sysconfig.get_paths(); \
             print(os.path.realpath(sys.executable)); print(os.path.realpath(p['stdlib'])); \
             print(os.path.realpath(p['purelib']))",
        ])
        .output()
        .expect("venv python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let mut lines = text.lines().map(PathBuf::from);
    PythonLayout {
        interpreter: lines.next().expect("interpreter"),
        stdlib: lines.next().expect("stdlib"),
        site_packages: lines.next().expect("site-packages"),
    }
}

/// `root` + an absolute host path.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Hard-links (same inode: the host's own files) every top-level file of `dir` into `root`,
/// recreating symlinks; `copy` names files that get a real copy (a new inode) instead.
fn mirror_dir(root: &Path, dir: &Path, copy: &[&str]) {
    let dest = under(root, dir);
    std::fs::create_dir_all(&dest).expect("mkdir");
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let (src, name) = (e.path(), e.file_name());
        let to = dest.join(&name);
        let ft = e.file_type().expect("file type");
        if ft.is_symlink() {
            let target = std::fs::read_link(&src).expect("readlink");
            std::os::unix::fs::symlink(target, &to).expect("symlink");
        } else if ft.is_file() {
            // A real copy for the named files; a hard link (the host's inode) for the rest,
            // or a copy where linking fails (another filesystem).
            let own_copy = copy.iter().any(|c| name == *c);
            if own_copy || std::fs::hard_link(&src, &to).is_err() {
                std::fs::copy(&src, &to).expect("copy");
            }
        }
    }
}

/// A private root for a "container": the host's libraries (hard links) except libssl and
/// libcrypto, which are copies at other inodes; the venv's interpreter; the stdlib and the
/// SDKs' site-packages are bind-mounted read-only when the client starts.
struct PrivateRoot {
    dir: tempfile::TempDir,
    py: PythonLayout,
}

impl PrivateRoot {
    fn build() -> PrivateRoot {
        let dir = tempfile::Builder::new()
            .prefix("llmw-ct-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        for link in ["/lib", "/lib64", "/bin"] {
            let target = std::fs::read_link(link).unwrap_or_else(|_| {
                panic!("{link} is not a symlink: this test expects merged /usr")
            });
            std::os::unix::fs::symlink(target, under(root, Path::new(link))).expect("symlink");
        }
        mirror_dir(root, Path::new(LIB_DIR), &["libssl.so.3", "libcrypto.so.3"]);
        mirror_dir(root, Path::new("/usr/lib64"), &[]);
        let py = python_layout();
        let bin = py.interpreter.parent().expect("bin dir");
        let dest = under(root, bin);
        std::fs::create_dir_all(&dest).expect("mkdir bin");
        std::fs::hard_link(
            &py.interpreter,
            dest.join(py.interpreter.file_name().expect("name")),
        )
        .or_else(|_| {
            std::fs::copy(
                &py.interpreter,
                dest.join(py.interpreter.file_name().expect("name")),
            )
            .map(|_| ())
        })
        .expect("link interpreter");
        // libpythonX.Y.so and friends sit next to the stdlib directory.
        mirror_dir(root, py.stdlib.parent().expect("lib dir"), &[]);
        std::fs::create_dir_all(under(root, &py.stdlib)).expect("mkdir stdlib");
        let version = py.stdlib.file_name().expect("python3.X").to_owned();
        let venv = root.join("venv");
        std::fs::create_dir_all(venv.join("bin")).expect("mkdir venv");
        std::fs::create_dir_all(venv.join("lib").join(&version).join("site-packages"))
            .expect("mkdir site-packages");
        std::fs::write(
            venv.join("pyvenv.cfg"),
            format!(
                "home = {}\ninclude-system-site-packages = false\n",
                bin.display()
            ),
        )
        .expect("pyvenv.cfg");
        std::os::unix::fs::symlink(&py.interpreter, venv.join("bin/python")).expect("venv python");
        for d in ["dev", "proc", "tmp"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        PrivateRoot { dir, py }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// (dev, inode) of the root's own libssl copy.
    fn libssl_id(&self) -> (u64, u64) {
        let md = std::fs::metadata(under(self.path(), &Path::new(LIB_DIR).join("libssl.so.3")))
            .expect("stat libssl copy");
        (md.dev(), md.ino())
    }

    /// `unshare --fork --pid --mount`: mounts the stdlib and the SDKs read-only, /dev and a fresh
    /// /proc, chroots, and runs `script` (written to the root's /tmp) with the venv's python.
    fn python(&self, script: &str, envs: &[(&str, String)]) -> Command {
        std::fs::write(self.path().join("tmp/client.py"), script).expect("write script");
        self.chrooted(&["/venv/bin/python", "-u", "/tmp/client.py"], envs)
    }

    /// The same for node: the root gets its own copy of the node binary (another inode, with
    /// the OpenSSL node carries inside it), which runs `script`.
    fn node(&self, script: &str, envs: &[(&str, String)]) -> Command {
        let node = under(self.path(), Path::new(NODE));
        if !node.exists() {
            std::fs::create_dir_all(node.parent().expect("bin")).expect("mkdir");
            std::fs::copy(NODE, &node).expect("copy node");
        }
        std::fs::write(self.path().join("tmp/client.js"), script).expect("write script");
        self.chrooted(&[NODE, "/tmp/client.js"], envs)
    }

    /// (dev, inode) of the root's own node copy.
    fn node_id(&self) -> (u64, u64) {
        let md = std::fs::metadata(under(self.path(), Path::new(NODE))).expect("stat node copy");
        (md.dev(), md.ino())
    }

    /// `argv` run chrooted into the root in new pid and mount namespaces.
    fn chrooted(&self, argv: &[&str], envs: &[(&str, String)]) -> Command {
        let version = self.py.stdlib.file_name().expect("python3.X");
        let venv_site = Path::new("/venv/lib").join(version).join("site-packages");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--fork",
            "--pid",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
        ])
        .arg(
            r#"set -e
R="$1"
ro() { mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; }
ro "$2" "$R$2"
ro "$3" "$R$4"
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
shift 4
exec chroot "$R" "$@""#,
        )
        .arg("sh")
        .arg(self.path())
        .arg(&self.py.stdlib)
        .arg(&self.py.site_packages)
        .arg(venv_site)
        .args(argv)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd
    }
}

/// The host's node (v20 here: OpenSSL built into the binary).
const NODE: &str = "/usr/bin/node";

/// One chat completion right away, then exit.
const NODE_NOW: &str = r#"
const https = require('https'); const fs = require('fs');
const u = new URL(process.env.URL + '/v1/chat/completions');
const body = JSON.stringify({model: 'gpt-4o-mini', messages: [{role: 'user', content: 'hello there'}]});
const req = https.request({hostname: u.hostname, port: u.port, path: u.pathname, method: 'POST',
  ca: fs.readFileSync(process.env.CA),
  headers: {'content-type': 'application/json', 'content-length': Buffer.byteLength(body),
            'authorization': 'Bearer sk-test-secret', 'x-tenant-id': process.env.TENANT}},
  res => { res.resume(); res.on('end', () => console.log('ok ' + res.statusCode)); });
req.on('error', e => { console.error(e); process.exit(1); });
req.end(body);
"#;

#[test]
fn chrooted_node_with_its_own_binary_is_billed_exactly() {
    require_root();
    let _g = serial();
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let host = m.addr().to_string();
    let root = PrivateRoot::build();
    std::fs::copy(m.ca_pem_path(), root.path().join("tmp/ca.pem")).expect("copy CA");
    let obs = Observer::start(&redis.url(), &[(host.as_str(), "openai")], "", false);
    let (out, took) = run(
        root.node(NODE_NOW, &mock_env(&m, "/tmp/ca.pem", "t-node")),
        "chrooted node",
    );
    eprintln!("chrooted node: {} (exec to exit {took:?})", out.trim());
    assert_eq!(out.trim(), "ok 200");
    assert_ledger(&redis.url(), "t-node", billed(&m), &obs);
    assert_attached(&obs, root.node_id(), "the root's own node binary");
}

/// Makes its calls at once: one plain, one streamed; prints how long it lived.
const PY_OPENAI_NOW: &str = r#"
import os, time
t0 = time.monotonic()
import httpx, openai
c = openai.OpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret",
                  http_client=httpx.Client(verify=os.environ["CA"]),
                  default_headers={"X-Tenant-ID": os.environ["TENANT"]})
c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
s = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}],
                              stream=True, stream_options={"include_usage": True})
for _ in s:
    pass
print("ok %d ms" % ((time.monotonic() - t0) * 1000))
"#;

fn mock_env(m: &MockProvider, ca: &str, tenant: &str) -> Vec<(&'static str, String)> {
    vec![
        ("URL", m.https_url()),
        ("CA", ca.to_owned()),
        ("TENANT", tenant.to_owned()),
    ]
}

/// Runs a client to completion; returns its stdout and wall time.
fn run(mut cmd: Command, what: &str) -> (String, Duration) {
    let t = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), took)
}

fn assert_attached(obs: &Observer, id: (u64, u64), what: &str) {
    let needle = format!("dev={} ino={}", id.0, id.1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !obs.log().contains(&needle) {
        assert!(
            Instant::now() < deadline,
            "{what}: no attach to (dev, ino) {id:?}; log:\n{}",
            obs.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn chrooted_client_with_its_own_libssl_in_new_namespaces_is_billed_exactly() {
    require_root();
    let _g = serial();
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let host = m.addr().to_string();
    let root = PrivateRoot::build();
    std::fs::copy(m.ca_pem_path(), root.path().join("tmp/ca.pem")).expect("copy CA");
    let obs = Observer::start(&redis.url(), &[(host.as_str(), "openai")], "", false);

    let cmd = root.python(PY_OPENAI_NOW, &mock_env(&m, "/tmp/ca.pem", "t-chroot"));
    let (out, took) = run(cmd, "chrooted python openai");
    eprintln!("chrooted client: {} (exec to exit {took:?})", out.trim());
    assert_ledger(&redis.url(), "t-chroot", billed(&m), &obs);
    assert_attached(&obs, root.libssl_id(), "the root's own libssl copy");
    assert_found_by_open(&obs);
    assert!(!obs.log().contains("sk-test-secret"), "keys never logged");
}

/// The library was found because the kernel reported it opened, not by a timed scan.
fn assert_found_by_open(obs: &Observer) {
    let metrics = obs.metrics();
    let count = |trigger: &str| {
        let needle = format!("llmwarden_observer_attaches_total{{trigger=\"{trigger}\"}}");
        metrics
            .lines()
            .find(|l| l.starts_with(&needle))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        count("open") >= 1,
        "no attach triggered by an open event; metrics:\n{metrics}\nlog:\n{}",
        obs.log()
    );
    assert_eq!(
        count("rescan"),
        0,
        "the safety-net rescan found a library:\n{metrics}"
    );
    let window = metrics
        .lines()
        .find(|l| l.starts_with("llmwarden_observer_attach_window_seconds_sum"))
        .unwrap_or("none");
    eprintln!("attach window: {window}");
}

/// The smallest client that can: the standard library's `http.client` posts one chat
/// completion right after importing `ssl` (libssl loaded by `dlopen` of `_ssl`), then exits.
/// `DELAY_MS` after the import, if set.
const PY_STDLIB_NOW: &str = r#"
import os, time, json, ssl, http.client
time.sleep(int(os.environ.get("DELAY_MS", "0")) / 1000)
host, port = os.environ["URL"].removeprefix("https://").rsplit(":", 1)
ctx = ssl.create_default_context(cafile=os.environ["CA"])
c = http.client.HTTPSConnection(host, int(port), context=ctx)
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]})
c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
          "Authorization": "Bearer sk-test-secret", "X-Tenant-ID": os.environ["TENANT"]})
r = c.getresponse()
assert r.status == 200, r.status
r.read()
c.close()
"#;

#[test]
fn short_lived_chrooted_client_calling_at_once_is_billed_exactly() {
    require_root();
    let _g = serial();
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let host = m.addr().to_string();
    let root = PrivateRoot::build();
    std::fs::copy(m.ca_pem_path(), root.path().join("tmp/ca.pem")).expect("copy CA");
    let obs = Observer::start(&redis.url(), &[(host.as_str(), "openai")], "", false);
    for (i, delay) in [0, 300].into_iter().enumerate() {
        let mut env = mock_env(&m, "/tmp/ca.pem", "t-short");
        env.push(("DELAY_MS", delay.to_string()));
        let (_, took) = run(root.python(PY_STDLIB_NOW, &env), "chrooted stdlib client");
        eprintln!("stdlib client {i} (call {delay} ms after import): exec to exit {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "the client is short-lived: {took:?}"
        );
    }
    assert_ledger(&redis.url(), "t-short", billed(&m), &obs);
    assert_attached(&obs, root.libssl_id(), "the root's own libssl copy");
    assert_found_by_open(&obs);
}

/// Imports the SDK (mapping libssl), says "ready", waits for WAIT_FILE, then calls.
const PY_OPENAI_GATED: &str = r#"
import os, sys, time, httpx, openai
print("ready", flush=True)
while not os.path.exists(os.environ["WAIT_FILE"]):
    time.sleep(0.05)
c = openai.OpenAI(base_url=os.environ["URL"] + "/v1", api_key="sk-test-secret",
                  http_client=httpx.Client(verify=os.environ["CA"]),
                  default_headers={"X-Tenant-ID": os.environ["TENANT"]})
c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
print("ok")
"#;

#[test]
fn client_whose_libssl_was_replaced_on_disk_is_billed_exactly() {
    require_root();
    let _g = serial();
    let redis = RedisServer::start();
    let m = MockProvider::start_background(MockConfig::default());
    let host = m.addr().to_string();
    let libs = tempfile::Builder::new()
        .prefix("llmw-upgrade-")
        .tempdir()
        .expect("tempdir");
    for lib in ["libssl.so.3", "libcrypto.so.3"] {
        std::fs::copy(Path::new(LIB_DIR).join(lib), libs.path().join(lib)).expect("copy lib");
    }
    let ssl = libs.path().join("libssl.so.3");
    let old = std::fs::metadata(&ssl).expect("stat");
    let old_id = (old.dev(), old.ino());
    let gate = libs.path().join("go");
    let mut cmd = Command::new(llmwarden_tests::python::venv_python());
    cmd.args(["-u", "-c", PY_OPENAI_GATED])
        .env("LD_LIBRARY_PATH", libs.path())
        .env("WAIT_FILE", &gate)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in mock_env(&m, &m.ca_pem_path().display().to_string(), "t-replaced") {
        cmd.env(k, v);
    }
    let mut child = Killed(cmd.spawn().expect("start python"));
    let mut stdout = std::io::BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read ready");
    assert_eq!(line.trim(), "ready", "client did not start");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.0.id())).expect("maps");
    assert!(
        maps.contains(&ssl.display().to_string()),
        "the client maps the copied libssl:\n{maps}"
    );

    // An upgrade as a package manager does it: new file, renamed over the old one.
    let next = libs.path().join("libssl.so.3.new");
    std::fs::copy(Path::new(LIB_DIR).join("libssl.so.3"), &next).expect("copy new");
    std::fs::rename(&next, &ssl).expect("rename over");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.0.id())).expect("maps");
    assert!(
        maps.contains(&format!("{} (deleted)", ssl.display())),
        "the old libssl is deleted but mapped:\n{maps}"
    );

    let obs = Observer::start(&redis.url(), &[(host.as_str(), "openai")], "", false);
    std::fs::write(&gate, b"go").expect("open gate");
    let out = child.wait_output();
    assert!(
        out.status.success(),
        "gated client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ledger(&redis.url(), "t-replaced", billed(&m), &obs);
    assert_attached(&obs, old_id, "the deleted-but-mapped libssl");
}

/// A client whose stdout the test reads line by line; killed if the test fails first.
struct Killed(std::process::Child);

impl Killed {
    fn wait_output(&mut self) -> std::process::Output {
        let mut stderr = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let status = self.0.wait().expect("wait");
        std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: stderr.into_bytes(),
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
