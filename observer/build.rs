//! Builds observer-ebpf with nightly + bpf-linker (aya-build) so `src/bpf.rs` can embed the object.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
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
        "building observer-ebpf (needs nightly + rust-src and bpf-linker, see shared/TOOLCHAIN.md)",
    )
}
