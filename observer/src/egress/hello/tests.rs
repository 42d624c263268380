use super::*;
use proptest::prelude::*;
use std::sync::Arc;

/// A real ClientHello, as rustls (ring) sends it for `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).expect("connection");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

#[test]
fn reads_the_server_name_of_a_rustls_hello() {
    let h = client_hello("api.openai.com");
    assert_eq!(parse(&h), Hello::Sni("api.openai.com".into()));
}

#[test]
fn an_ip_address_sends_no_name() {
    let h = client_hello("127.0.0.1");
    assert_eq!(parse(&h), Hello::NoSni);
}

#[test]
fn a_cut_hello_keeps_a_name_before_the_cut() {
    let h = client_hello("llm.test");
    let at = h
        .windows(8)
        .position(|w| w == b"llm.test")
        .expect("name in the hello");
    assert_eq!(parse(&h[..at + 8]), Hello::Sni("llm.test".into()));
    assert_eq!(parse(&h[..at + 4]), Hello::Truncated);
    assert_eq!(parse(&h[..20]), Hello::Truncated);
}

#[test]
fn plaintext_is_not_tls() {
    assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Hello::NotTls);
    assert_eq!(parse(b""), Hello::NotTls);
}

proptest! {
    #[test]
    fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..600), cut in 0usize..600) {
        let _ = parse(&data);
        let mut h = client_hello("api.anthropic.com");
        let n = cut.min(h.len());
        h.truncate(n);
        let _ = parse(&h);
        let mut tail = h.clone();
        tail.extend_from_slice(&data);
        let _ = parse(&tail);
    }
}
