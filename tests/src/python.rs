//! The Python venv with the official `openai` and `anthropic` SDKs (made by `cargo xtask setup`).

use std::path::PathBuf;

/// The venv's python. Panics with the fix when the venv is missing.
#[must_use]
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("LLMWARDEN_VENV").map_or_else(
        || crate::process::workspace_root().join(".venv"),
        PathBuf::from,
    );
    let py = venv.join("bin").join("python");
    assert!(
        py.exists(),
        "no Python venv at {}: run `cargo xtask setup` (it installs the openai and anthropic SDKs)",
        venv.display()
    );
    py
}
