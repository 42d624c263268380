//! `cargo xtask test`: setup, formatting, lints, then every test against real processes.

use clap::Args;

use anyhow::{Result, bail};

use crate::command::{self, cargo, is_root, step};

/// Options of `cargo xtask test`.
#[derive(Args)]
pub struct TestArgs {
    /// Skip `cargo xtask setup` (for a machine already set up).
    #[arg(long)]
    no_setup: bool,
    /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(last = true)]
    rest: Vec<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    if !args.no_setup {
        crate::setup::run()?;
    }
    if !is_root() {
        // The eBPF tests fail loudly without root; say why up front rather than after the build.
        step("WARNING: not root: the observer's eBPF tests will fail (they need CAP_SYS_ADMIN)");
    }
    // A test run builds once from scratch (CI) or rebuilds after an edit: incremental caches
    // double target/ and buy nothing here (see docs/development.md, "Disk").
    // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("CARGO_INCREMENTAL", "0") };
    crate::disk::report("before the build")?;
    step("cargo fmt --check");
    command::run(cargo().args(["fmt", "--all", "--check"]))?;
    step("cargo clippy -D warnings");
    command::run(workspace("clippy").args(["--all-targets", "--", "-D", "warnings"]))?;
    step("the repository is self-contained (nothing outside it is read or named)");
    crate::selfcontained::run()?;
    step("validating the Kubernetes manifests against the API schemas");
    command::run(
        std::process::Command::new(crate::command::root().join(".venv/bin/kubernetes-validate"))
            .arg("--strict")
            .args(manifests()?),
    )?;
    // Every binary and test in one build, so one feature resolution: building the binaries alone
    // (`-p enforcer -p observer -p llmwarden-tests --bins`) leaves out the dev-dependencies'
    // features, and `cargo test` then compiled 66 crates (tokio, hyper, rustls, redis, the
    // tokenizers...) a second time (see docs/development.md, "Disk"). The demo reuses these.
    step("building the binaries the integration tests start, and the tests");
    command::run(workspace("build").args(["--bins", "--tests"]))?;
    step("cargo test (unit, integration with real redis-server, SDKs, eBPF)");
    let mut test = workspace("test");
    test.arg("--no-fail-fast");
    if !args.rest.is_empty() {
        test.arg("--").args(&args.rest);
    }
    if command::run(&mut test).is_err() {
        bail!("tests failed (see above)");
    }
    crate::disk::report("after the workspace tests")?;
    crate::disk::make_room_for_fuzz()?;
    step("fuzz smoke: kept regressions, then a few seconds per target");
    crate::fuzz::smoke()?;
    crate::disk::report("after the fuzz smoke")?;
    step("the demo, non-interactively: denials via the enforcer, bypass via the observer");
    crate::demo::run(&crate::demo::DemoArgs::checked_run())?;
    step("all checks passed");
    Ok(())
}

/// `cargo <sub>` over the host crates of the workspace. observer-ebpf targets bpfel-unknown-none
/// with nightly; observer/build.rs builds (and so checks) it. On the host target its
/// #[panic_handler] would clash with std.
pub fn workspace(sub: &str) -> std::process::Command {
    let mut c = cargo();
    c.args([sub, "--workspace", "--exclude", "observer-ebpf", "--locked"]);
    c
}

/// Every YAML file under deploy/kubernetes.
fn manifests() -> Result<Vec<std::path::PathBuf>> {
    let dir = crate::command::root().join("deploy/kubernetes");
    let mut v: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    Ok(v)
}
