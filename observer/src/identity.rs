//! What names the provider of a decoded call (`provider_identity`).
//!
//! A call's Host header (or `:authority`) is a claim the process makes in plaintext: a local
//! server sent `Host: api.openai.com` would be billed as OpenAI. Under
//! `provider_identity = "connection"` a call is recorded only when the connection itself
//! vouches for that provider:
//! - the TLS server name (SNI) the process set on that very connection (`SSL_ctrl`
//!   `SSL_CTRL_SET_TLSEXT_HOSTNAME`, reported by the kernel per `SSL*`) is a host of the
//!   provider; or
//! - its process has a TCP connection to one of the provider's resolved addresses, opened before
//!   the call (egress accounting; the only evidence for clients that send no SNI: Go, and any
//!   client calling an IP address).

use std::collections::HashMap;

use ledger::provider::ProviderDetector;

/// Most connections whose server name is remembered (a process that leaks `SSL*` objects must
/// not grow this without bound).
const MAX_NAMES: usize = 65_536;

/// Server names per connection, and the rule.
pub struct Identity {
    by_connection: bool,
    names: HashMap<(u32, u64), String>,
}

impl Identity {
    /// `by_connection`: `provider_identity = "connection"`.
    pub fn new(by_connection: bool) -> Identity {
        Identity {
            by_connection,
            names: HashMap::new(),
        }
    }

    /// Whether calls need the connection's word for their provider.
    pub fn by_connection(&self) -> bool {
        self.by_connection
    }

    /// Connection `ssl` of `pid` named its server `name` (raw bytes from the kernel).
    pub fn server_name(&mut self, pid: u32, ssl: u64, name: &[u8]) {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let Ok(name) = std::str::from_utf8(&name[..end]) else {
            return;
        };
        if self.names.len() >= MAX_NAMES {
            self.names.clear();
        }
        self.names.insert((pid, ssl), name.to_owned());
    }

    /// The server name connection `ssl` of `pid` sent, if the kernel reported one.
    pub fn name_of(&self, pid: u32, ssl: u64) -> Option<&str> {
        self.names.get(&(pid, ssl)).map(String::as_str)
    }

    /// Whether the server name of connection `ssl` of `pid` is a host of `provider`.
    pub fn named(&self, det: &ProviderDetector, pid: u32, ssl: u64, provider: &str) -> bool {
        self.name_of(pid, ssl)
            .and_then(|n| det.provider_of_server_name(n))
            .is_some_and(|p| p == provider)
    }

    /// Connection `ssl` of `pid` ended (`SSL_free`).
    pub fn closed(&mut self, pid: u32, ssl: u64) {
        self.names.remove(&(pid, ssl));
    }

    /// Process `pid` is gone.
    pub fn forget(&mut self, pid: u32) {
        self.names.retain(|&(p, _), _| p != pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_vouches_only_for_the_provider_it_named() {
        let det = ProviderDetector::new();
        let mut id = Identity::new(true);
        id.server_name(7, 0xa, b"api.openai.com\0\0");
        id.server_name(7, 0xb, b"localhost");
        assert!(id.named(&det, 7, 0xa, "openai"));
        assert!(!id.named(&det, 7, 0xa, "anthropic"));
        assert!(!id.named(&det, 7, 0xb, "openai"), "not a provider host");
        assert!(
            !id.named(&det, 8, 0xa, "openai"),
            "another process's connection"
        );
        id.closed(7, 0xa);
        assert!(!id.named(&det, 7, 0xa, "openai"));
        id.forget(7);
        assert_eq!(id.name_of(7, 0xb), None);
        id.server_name(9, 1, &[0xff, 0xfe]);
        assert_eq!(id.name_of(9, 1), None, "not UTF-8: ignored");
    }
}
