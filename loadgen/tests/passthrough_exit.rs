//! The `passthrough` binary exits 0 on SIGTERM once it has served a call: `cargo xtask pgo` stops
//! its instrumented build that way, and an instrumented process writes its profile only on a
//! clean exit (one killed by the signal's default action leaves nothing and the PGO build fails).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A one-shot upstream on loopback: answers one HTTP/1.1 request with a small JSON body.
fn upstream() -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let port = l.local_addr().expect("upstream addr").port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).expect("read request");
            assert!(n > 0, "the pass-through closed before sending its request");
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )
        .expect("write answer");
    });
    (port, h)
}

#[test]
fn sigterm_ends_the_passthrough_with_status_zero() {
    let (up, served) = upstream();
    let mut child = Command::new(env!("CARGO_BIN_EXE_passthrough"))
        .args(["--route", &format!("openai=http://127.0.0.1:{up}/v1")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start passthrough");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the address line");
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("address JSON");
    let addr = v["addr"].as_str().expect("addr field").to_owned();

    // One call through it, so its runtimes and upstream pool are in use when the signal comes.
    let mut c = TcpStream::connect(&addr).expect("connect to passthrough");
    c.write_all(b"GET /openai/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("read answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    served.join().expect("upstream thread");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the pass-through did not exit within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status}");
}
