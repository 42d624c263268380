//! The TLS server name (SNI) of a connection, from the first bytes its process sent (the
//! ClientHello, reported by the kernel's `tcp_sendmsg` fentry). Parsed with `tls-parser`; a
//! ClientHello cut by the kernel's copy limit still yields the name when its extension lies
//! before the cut (extensions are then read one by one).

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extension,
    parse_tls_message_handshake, parse_tls_record_header,
};

/// What a connection's first bytes said about its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming this server.
    Sni(String),
    /// A whole ClientHello without a server name (e.g. a client calling an IP address).
    NoSni,
    /// A ClientHello cut before a server name was found.
    Truncated,
    /// Not a TLS ClientHello.
    NotTls,
}

const HANDSHAKE: u8 = 0x16;

/// Reads the server name from a connection's first bytes; never panics on any input.
pub fn parse(data: &[u8]) -> Hello {
    let Ok((body, hdr)) = parse_tls_record_header(data) else {
        return if data.len() < 5 && data.first() == Some(&HANDSHAKE) {
            Hello::Truncated
        } else {
            Hello::NotTls
        };
    };
    if hdr.record_type.0 != HANDSHAKE {
        return Hello::NotTls;
    }
    let cut = body.len() < usize::from(hdr.len);
    let body = &body[..body.len().min(usize::from(hdr.len))];
    match parse_tls_message_handshake(body) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)))) => {
            let mut ext = ch.ext.unwrap_or_default();
            while !ext.is_empty() {
                let Ok((rest, e)) = parse_tls_extension(ext) else {
                    break;
                };
                if let Some(name) = sni(&e) {
                    return Hello::Sni(name);
                }
                ext = rest;
            }
            Hello::NoSni
        }
        Ok(_) => Hello::NotTls,
        Err(_) if cut || body.len() < usize::from(hdr.len) => truncated(body),
        Err(_) => Hello::NotTls,
    }
}

/// The host name of an SNI extension.
fn sni(e: &TlsExtension<'_>) -> Option<String> {
    let TlsExtension::SNI(names) = e else {
        return None;
    };
    names
        .iter()
        .find(|(t, _)| *t == SNIType::HostName)
        .and_then(|(_, n)| std::str::from_utf8(n).ok())
        .map(str::to_owned)
}

/// A cut ClientHello: walks its fixed part to the extensions and reads those that are whole.
fn truncated(body: &[u8]) -> Hello {
    let walk = || -> Option<&[u8]> {
        // type (1) + length (3) + version (2) + random (32)
        let mut at = 38;
        let sid = usize::from(*body.get(at)?);
        at += 1 + sid;
        let suites = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
        at += 2 + suites;
        let comp = usize::from(*body.get(at)?);
        at += 1 + comp + 2; // and the extensions' length
        (body.first() == Some(&1)).then(|| body.get(at..))?
    };
    let Some(mut ext) = walk() else {
        return if body.first().is_none_or(|&t| t == 1) {
            Hello::Truncated
        } else {
            Hello::NotTls
        };
    };
    while let Ok((rest, e)) = parse_tls_extension(ext) {
        if let Some(name) = sni(&e) {
            return Hello::Sni(name);
        }
        ext = rest;
    }
    Hello::Truncated
}

#[cfg(test)]
mod tests;
