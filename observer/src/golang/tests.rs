//! Against really built Go binaries: the tests crate's Go client (`tests/go/llmclient`), built
//! here with the host's Go, normal and stripped (`-ldflags="-s -w"`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use object::{Object as _, ObjectSection as _};

use super::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds the Go client once per variant (normal, stripped) under target/go-test/observer-unit.
fn go_client(stripped: bool) -> PathBuf {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    let (plain, strip) = BUILT.get_or_init(|| {
        let dir = root().join("target/go-test/observer-unit");
        std::fs::create_dir_all(&dir).unwrap();
        let build = |name: &str, flags: &[&str]| {
            let out = dir.join(name);
            let st = Command::new("go")
                .arg("build")
                .args(flags)
                .arg("-o")
                .arg(&out)
                .arg(".")
                .current_dir(root().join("tests/go/llmclient"))
                .env("GOCACHE", root().join("target/go-test/cache"))
                .env("GOPATH", root().join("target/go-test/gopath"))
                .env("GOFLAGS", "")
                .env("GOPROXY", "off")
                .env("GOTOOLCHAIN", "local")
                .env("CGO_ENABLED", "0")
                .status()
                .expect("these tests need `go` (apt-get install golang-go)");
            assert!(st.success(), "go build {name}");
            out
        };
        (
            build("llmclient", &[]),
            build("llmclient-stripped", &["-ldflags=-s -w"]),
        )
    });
    if stripped {
        strip.clone()
    } else {
        plain.clone()
    }
}

fn go_version() -> String {
    let out = Command::new("go").arg("version").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned()
}

/// File offsets of every RET of `func`, from `go tool objdump` (Go's own disassembler).
fn objdump_rets(bin: &Path, func: &str) -> Vec<u64> {
    objdump_lines(bin, func, |insn| insn == ["RET"])
}

/// File offsets of the instructions of `func` whose text (after the encoding, split at
/// whitespace) `pick` accepts, from `go tool objdump`.
fn objdump_lines(bin: &Path, func: &str, pick: impl Fn(&[&str]) -> bool) -> Vec<u64> {
    let pattern = format!(
        "^{}$",
        func.replace('(', r"\(")
            .replace(')', r"\)")
            .replace('*', r"\*")
    );
    let out = Command::new("go")
        .args(["tool", "objdump", "-s", &pattern])
        .arg(bin)
        .env("GOCACHE", root().join("target/go-test/cache"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let data = std::fs::read(bin).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let textsec = file.section_by_name(".text").unwrap();
    let (off, _) = textsec.file_range().unwrap();
    text.lines()
        .filter(|l| pick(&l.split_whitespace().skip(3).collect::<Vec<_>>()))
        .map(|l| {
            let addr = u64::from_str_radix(
                l.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .trim_start_matches("0x"),
                16,
            )
            .unwrap();
            addr - textsec.address() + off
        })
        .collect()
}

fn tls(bin: &Path) -> GoTls {
    let file = std::fs::File::open(bin).unwrap();
    let cache = object::ReadCache::new(&file);
    match inspect(&cache).unwrap() {
        GoBinary::Tls(t) => t,
        other => panic!("{}: {other:?}", bin.display()),
    }
}

#[test]
fn finds_the_tls_functions_of_a_go_binary() {
    let bin = go_client(false);
    let t = tls(&bin);
    assert_eq!(t.version, go_version());
    assert!(!t.stripped);
    let rets = objdump_rets(&bin, READ);
    assert!(!rets.is_empty());
    assert_eq!(
        t.read_rets, rets,
        "every RET of (*Conn).Read, as Go disassembles it"
    );
    assert!(t.close.is_some());
    // Read's data is taken at its one copy out, a CALL the kernel emulates.
    let copies = objdump_lines(&bin, READ, |insn| insn == ["CALL", "runtime.memmove(SB)"]);
    assert_eq!(copies.len(), 1, "Go 1.19's (*Conn).Read copies out once");
    assert_eq!(t.read_copy, Some(copies[0]));
    // The probes sit on the stack check's JBE rel32 (emulated by the kernel), after a 4-byte
    // CMP (Read), or after LEAQ + CMP (Write, a larger frame). Never the entry itself.
    assert!(
        t.at_check,
        "Go 1.17+ (*Conn).Write, Read and Close all check their stack"
    );
    let data = std::fs::read(&bin).unwrap();
    for (off, name) in [(t.write, WRITE), (t.read, READ), (t.close.unwrap(), CLOSE)] {
        let at = &data[usize::try_from(off).unwrap()..];
        assert_eq!(
            &at[..2],
            &[0x0f, 0x86],
            "{name}: the probe is on a JBE rel32"
        );
        let before = &data[usize::try_from(off).unwrap() - 4..usize::try_from(off).unwrap()];
        assert_eq!(before[3], 0x10, "{name}: right after CMPQ 0x10(R14), reg");
    }
}

#[test]
fn a_stripped_go_binary_is_read_from_its_pclntab() {
    let plain = tls(&go_client(false));
    let stripped_bin = go_client(true);
    let data = std::fs::read(&stripped_bin).unwrap();
    let file = object::File::parse(&*data).unwrap();
    assert!(file.section_by_name(".symtab").is_none(), "really stripped");
    let t = tls(&stripped_bin);
    assert!(t.stripped);
    assert_eq!(t.version, plain.version);
    // `go tool objdump` needs the symbol table, so compare with the unstripped build.
    assert_eq!(t.read_rets, plain.read_rets);
    assert_eq!(t.read_copy, plain.read_copy);
    // Same code, same layout: -s -w only drops tables after the text.
    assert_eq!(
        (t.write, t.read, t.close),
        (plain.write, plain.read, plain.close)
    );
    // The same answer from the bytes in memory.
    assert_eq!(inspect(&*data).unwrap(), GoBinary::Tls(t));
}

#[test]
fn other_files_are_not_go() {
    let exe = std::env::current_exe().unwrap();
    let data = std::fs::read(exe).unwrap();
    assert_eq!(inspect(&*data).unwrap(), GoBinary::NotGo);
    assert_eq!(inspect(&b"#!/bin/sh\n"[..]).unwrap(), GoBinary::NotGo);
}

#[test]
fn go_older_than_1_17_is_unsupported() {
    // The real binary with its build info saying go1.16: the stack ABI, so no probes.
    let mut data = std::fs::read(go_client(false)).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let (off, len) = file
        .section_by_name(".go.buildinfo")
        .unwrap()
        .file_range()
        .unwrap();
    let (off, len) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
    let section = &mut data[off..off + len];
    let at = section
        .windows(5)
        .position(|w| w == b"go1.1")
        .expect("version in the build info");
    section[at + 5] = b'6';
    match inspect(&*data).unwrap() {
        GoBinary::Unsupported { version, reason } => {
            assert!(version.starts_with("go1.16"), "{version}");
            assert!(reason.contains("1.17"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_go_binary_without_tls_is_known_as_such() {
    let dir = root().join("target/go-test/observer-unit/hello");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("go.mod"), "module hello\n\ngo 1.19\n").unwrap();
    std::fs::write(
        dir.join("main.go"),
        "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello\") }\n",
    )
    .unwrap();
    let out = dir.join("hello");
    let st = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(&dir)
        .env("GOCACHE", root().join("target/go-test/cache"))
        .env("GOPATH", root().join("target/go-test/gopath"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .status()
        .expect("these tests need `go` (apt-get install golang-go)");
    assert!(st.success());
    let data = std::fs::read(&out).unwrap();
    assert_eq!(
        inspect(&*data).unwrap(),
        GoBinary::NoTls {
            version: go_version()
        }
    );
}

/// Externally linked (cgo, `-linkmode=external`): C start-up code comes first in `.text`, so
/// `runtime.text` is not the section start; the stripped build must still agree with `.symtab`.
#[test]
fn an_externally_linked_stripped_go_binary_agrees_with_its_symtab() {
    let dir = root().join("target/go-test/observer-unit");
    std::fs::create_dir_all(&dir).unwrap();
    let build =
        |name: &str, ldflags: &str| build_with(&dir, name, &[&format!("-ldflags={ldflags}")], "1");
    let full = tls(&build("llmclient-ext", "-linkmode=external"));
    let stripped = tls(&build("llmclient-ext-stripped", "-linkmode=external -s -w"));
    assert!(!full.stripped && stripped.stripped);
    assert!(full.read_copy.is_some(), "Read's copy out found");
    assert_eq!(
        (
            stripped.write,
            stripped.read,
            &stripped.read_rets,
            stripped.read_copy,
            stripped.close
        ),
        (
            full.write,
            full.read,
            &full.read_rets,
            full.read_copy,
            full.close
        )
    );
}

/// `-buildmode=pie`: the function table lives in `.data.rel.ro.gopclntab`.
#[test]
fn a_pie_stripped_go_binary_agrees_with_its_symtab() {
    let dir = root().join("target/go-test/observer-unit");
    std::fs::create_dir_all(&dir).unwrap();
    let full = tls(&build_with(&dir, "llmclient-pie", &["-buildmode=pie"], "0"));
    let stripped = tls(&build_with(
        &dir,
        "llmclient-pie-stripped",
        &["-buildmode=pie", "-ldflags=-s -w"],
        "0",
    ));
    assert!(!full.stripped && stripped.stripped);
    assert!(full.read_copy.is_some(), "Read's copy out found");
    assert_eq!(
        (
            stripped.write,
            stripped.read,
            &stripped.read_rets,
            stripped.read_copy,
            stripped.close
        ),
        (
            full.write,
            full.read,
            &full.read_rets,
            full.read_copy,
            full.close
        )
    );
}

fn build_with(dir: &Path, name: &str, flags: &[&str], cgo: &str) -> PathBuf {
    let out = dir.join(name);
    let st = Command::new("go")
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(".")
        .current_dir(root().join("tests/go/llmclient"))
        .env("GOCACHE", root().join("target/go-test/cache"))
        .env("GOPATH", root().join("target/go-test/gopath"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", cgo)
        .status()
        .expect("these tests need `go` (apt-get install golang-go) and a C compiler");
    assert!(st.success(), "go build {name}");
    out
}
