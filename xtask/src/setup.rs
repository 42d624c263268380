//! `cargo xtask setup`: installs what is missing, idempotently, saying what it does.
//!
//! The recipe is docs/development.md's: LLVM 22 for bpf-linker (it must match rustc's LLVM 22),
//! rust-src for the nightly that builds the eBPF crate, redis-server for the ledger tests, and a venv
//! with the official `openai` and `anthropic` SDKs for the integration tests. Each command asks for
//! what it needs ([`Needs`]): the demo does not install the fuzzer.

use std::process::Command;

use anyhow::{Result, bail};

use crate::command::{self, cargo, is_root, output, root, step, succeeds};

/// Debian packages the build and tests need, with why.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links the eBPF object with LLVM 22",
    ),
    (
        "redis-server",
        "the ledger; tests start their own instance on a free port",
    ),
    ("curl", "an OpenSSL client for the observer tests"),
    (
        "nodejs",
        "a second OpenSSL client (node's https) for the observer tests",
    ),
    (
        "golang-go",
        "Go crypto/tls clients for the observer's Go coverage (issue 15)",
    ),
    ("python3-venv", "the venv holding the official SDKs"),
    ("libssl3", "the OpenSSL the observer attaches to"),
    ("ca-certificates", "TLS roots for package downloads"),
    ("pkg-config", "-sys crates"),
    (
        "linux-perf",
        "`cargo xtask bench` counts allocations per call with uprobes (`perf probe`, `perf stat`)",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz for `cargo xtask fuzz` and the smoke fuzz of `cargo xtask test` (builds with 1.95).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Python packages for the integration tests, pinned so a fresh machine gets what was tested.
const PYTHON_REQUIREMENTS: &str = "tests/python/requirements.txt";

/// What a command needs installed, so each installs only that (the demo does not fuzz).
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// cargo-fuzz (`cargo xtask test`'s fuzz smoke, `cargo xtask fuzz`).
    pub fuzz: bool,
    /// promtool (the tests validate deploy/prometheus with it).
    pub promtool: bool,
}

impl Needs {
    /// Everything: `cargo xtask setup` and `cargo xtask test`.
    pub const ALL: Needs = Needs {
        fuzz: true,
        promtool: true,
    };
    /// The demo: the build, the eBPF toolchain, redis-server and the SDK venv.
    pub const DEMO: Needs = Needs {
        fuzz: false,
        promtool: false,
    };
}

/// `cargo xtask setup`: everything any command needs.
pub fn run() -> Result<()> {
    run_for(Needs::ALL)
}

/// Installs what is missing of `needs` (plus the base every command shares).
pub fn run_for(needs: Needs) -> Result<()> {
    apt()?;
    rust_src()?;
    bpf_linker()?;
    if needs.fuzz {
        cargo_fuzz()?;
    }
    if needs.promtool {
        promtool()?;
    }
    venv()?;
    step("setup complete");
    Ok(())
}

/// What `cargo xtask fuzz` needs on its own: nightly with rust-src and cargo-fuzz.
pub fn fuzz_tools() -> Result<()> {
    rust_src()?;
    cargo_fuzz()
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(p, _)| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        step("apt packages: all present");
        return Ok(());
    }
    for (p, why) in APT_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        step(&format!("apt package {p} is missing ({why})"));
    }
    if !is_root() {
        bail!(
            "installing {} needs root: run `sudo cargo xtask setup`",
            missing.join(" ")
        );
    }
    command::run(Command::new("apt-get").args(["update", "-q"]))?;
    command::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

fn rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (builds the eBPF crate)");
        command::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src for nightly: present");
        return Ok(());
    }
    step("adding rust-src to nightly (build-std for bpfel-unknown-none)");
    command::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    command::run(
        cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

fn cargo_fuzz() -> Result<()> {
    let have = output(cargo().args(["fuzz", "--version"])).unwrap_or_default();
    if have.contains(CARGO_FUZZ_VERSION) {
        step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (the fuzz targets, about two minutes)"
    ));
    command::run(cargo().args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
}

/// Where [`promtool`] installs the binary.
const PROMTOOL: &str = "/usr/local/bin/promtool";

/// promtool checks and unit-tests deploy/prometheus's rules in `cargo xtask test`. Debian ships it
/// only inside the `prometheus` package, whose install also creates a server, a user and a
/// service; so only the one binary is taken from the package (`apt-get download`, `dpkg-deb -x`)
/// and installed as [`PROMTOOL`].
fn promtool() -> Result<()> {
    if succeeds(Command::new("promtool").arg("--version")) {
        step("promtool: present");
        return Ok(());
    }
    step(
        "promtool is missing (validates deploy/prometheus); taking it from Debian's prometheus package",
    );
    if !is_root() {
        bail!("installing {PROMTOOL} needs root: run `sudo cargo xtask setup`");
    }
    let dir = std::env::temp_dir().join(format!("llmwarden-promtool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", "prometheus"])
            .current_dir(&dir)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        // A fresh machine may not have the package lists yet.
        command::run(Command::new("apt-get").args(["update", "-q"]))?;
        if !download() {
            bail!("apt-get download prometheus failed in {}", dir.display());
        }
    }
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| anyhow::anyhow!("no .deb in {} after apt-get download", dir.display()))?;
    let unpacked = dir.join("x");
    command::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let bin = unpacked.join("usr/bin/promtool");
    if !bin.exists() {
        bail!("{} has no usr/bin/promtool", deb.display());
    }
    std::fs::copy(&bin, PROMTOOL)?;
    command::run(Command::new("chmod").args(["755", PROMTOOL]))?;
    std::fs::remove_dir_all(&dir)?;
    if !succeeds(Command::new(PROMTOOL).arg("--version")) {
        bail!("{PROMTOOL} does not run after installing it");
    }
    Ok(())
}

fn venv() -> Result<()> {
    let venv = root().join(".venv");
    let py = venv.join("bin/python");
    let req = root().join(PYTHON_REQUIREMENTS);
    let stamp = venv.join(".llmwarden-requirements");
    let wanted = std::fs::read_to_string(&req)?;
    if py.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        step("python venv with the official SDKs: present");
        return Ok(());
    }
    if !py.exists() {
        step(&format!("creating the python venv at {}", venv.display()));
        command::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    step("installing the official openai and anthropic SDKs into the venv");
    command::run(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&req),
    )?;
    if !succeeds(Command::new(&py).args(["-c", "import openai, anthropic, httpx, h2"])) {
        bail!(
            "the venv at {} cannot import openai/anthropic/httpx/h2 after installing them",
            venv.display()
        );
    }
    std::fs::write(&stamp, wanted)?;
    Ok(())
}
