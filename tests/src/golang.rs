//! Go test programs (sources under `tests/go/`), built by the tests themselves with the host's Go
//! toolchain (`golang-go`): standard library only, no network, the build cache under
//! `target/go-test/`. Each program is built once per test process and shared by its tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::process::workspace_root;

/// Built programs, by output name.
static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// Where the Go builds and their cache live.
#[must_use]
pub fn go_dir() -> PathBuf {
    workspace_root().join("target").join("go-test")
}

/// The observer's Go test client (`tests/go/llmclient`): a `net/http` client calling an
/// OpenAI-style chat endpoint; see its source for the flags. `stripped` builds it with
/// `-ldflags="-s -w"` (no `.symtab`, no DWARF).
///
/// # Panics
/// When Go is not installed or the build fails.
#[must_use]
pub fn llmclient(stripped: bool) -> PathBuf {
    let name = if stripped {
        "llmclient-stripped"
    } else {
        "llmclient"
    };
    let flags: &[&str] = if stripped { &["-ldflags=-s -w"] } else { &[] };
    build(&workspace_root().join("tests/go/llmclient"), name, flags)
}

/// The Go test client built with other `go build` flags (e.g. `-buildmode=pie`), as `name`.
///
/// # Panics
/// When Go is not installed or the build fails.
#[must_use]
pub fn llmclient_with(name: &str, flags: &[&str]) -> PathBuf {
    build(&workspace_root().join("tests/go/llmclient"), name, flags)
}

/// The Go version `go version` reports (e.g. `go1.19.8`).
///
/// # Panics
/// When Go is not installed.
#[must_use]
pub fn go_version() -> String {
    let out = Command::new("go")
        .arg("version")
        .output()
        .unwrap_or_else(|e| panic!("the Go tests need `go` (apt-get install golang-go; `cargo xtask setup` does it): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_owned()
}

/// Builds the Go package in `src` into `target/go-test/<name>` once per test process.
///
/// # Panics
/// When the build fails (with Go's output).
pub fn build(src: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let dir = go_dir();
    std::fs::create_dir_all(&dir).expect("create target/go-test");
    let out = dir.join(name);
    // Another test binary may build the same program at once: build to a private name, rename.
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let result = Command::new("go")
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(&tmp)
        .arg(".")
        .current_dir(src)
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap_or_else(|e| panic!("the Go tests need `go` (apt-get install golang-go; `cargo xtask setup` does it): {e}"));
    assert!(
        result.status.success(),
        "go build {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::rename(&tmp, &out).expect("rename the Go build into place");
    built.push((name.to_owned(), out.clone()));
    out
}
