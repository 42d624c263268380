//! A real redis-server on a free loopback port (ledger-store engineer fills this in).
