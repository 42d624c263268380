//! Builds observer-ebpf with nightly + bpf-linker (aya-build) so `src/bpf.rs` can embed the object.
//!
//! Not when fuzzing (cargo-fuzz builds with `--cfg fuzzing`): the fuzz targets use only the
//! library, which never embeds the object, and need neither bpf-linker nor a second nightly build.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        // An empty placeholder keeps the binary's `include_bytes_aligned!` compiling; loading it
        // would fail, but nothing built for fuzzing loads it.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("observer");
        std::fs::write(&out, b"").with_context(|| format!("writing {}", out.display()))?;
        return Ok(());
    }
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest
        .parent()
        .context("observer/ has a parent")?
        .join("observer-ebpf");
    let common_dir = manifest
        .parent()
        .context("observer/ has a parent")?
        .join("observer-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir.to_str().context("observer-ebpf path is UTF-8")?;
    let package = aya_build::Package {
        name: "observer-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly).context(
        "building observer-ebpf (needs nightly + rust-src and bpf-linker, see docs/development.md)",
    )
}
