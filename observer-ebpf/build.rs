//! Rebuilds the eBPF object when bpf-linker changes (a new version, or one built against another
//! LLVM, links a different object). The linker is an external program aya-build names in the
//! build's flags, so cargo would not notice it changed.

use std::path::PathBuf;

fn main() {
    // aya-build passes the target's architecture as this cfg (the Go probes read amd64 registers).
    println!(
        "cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\", \"arm\", \"riscv64\", \"powerpc64\", \"s390x\", \"mips\", \"loongarch64\"))"
    );
    let linker = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<PathBuf>>())
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file());
    match linker {
        Some(p) => println!("cargo:rerun-if-changed={}", p.display()),
        None => println!(
            "cargo:warning=bpf-linker is not on PATH; run `cargo xtask setup` (see docs/development.md)"
        ),
    }
}
