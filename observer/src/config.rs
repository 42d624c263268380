//! The observer's TOML configuration: parsed strictly (unknown keys are errors) and validated at
//! start-up with the exact key that is wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use anyhow::{Context as _, Result, bail};
use ledger::provider::ProviderKind;
use serde::{Deserialize, Serialize};

/// Default config path.
pub const DEFAULT_PATH: &str = "/etc/llmwarden/observer.toml";

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The shared ledger (`redis://[user@]host:port/`, `rediss://` for TLS, `redis+cluster://...`
    /// or `rediss+cluster://...`).
    pub redis_url: String,
    /// Environment variable holding the Redis password (ACL user from the URL); unset: the URL's.
    pub redis_password_env: Option<String>,
    /// PEM CA bundle that signed the Redis server's certificate (`rediss://`); unset: the system's.
    pub redis_ca_file: Option<PathBuf>,
    /// Where Prometheus scrapes `/metrics`; empty disables it.
    pub metrics_listen: String,
    /// Optional LiteLLM-format price file layered over the built-in table.
    pub prices_file: Option<PathBuf>,
    /// Price of models missing from the table (the enforcer's key of the same name): a call to an
    /// unknown model is recorded at it, flagged estimated, never at $0.
    pub unknown_model_price: ledger::billing::DefaultPrice,
    /// Model names priced as another model (the enforcer's key of the same name).
    pub model_aliases: std::collections::BTreeMap<String, String>,
    /// Most plaintext bytes copied per SSL call (request bodies beyond it are skipped, counted).
    pub per_call_bytes: u32,
    /// Kernel ring buffer size: a power of two, at least 4096.
    pub ring_buffer_bytes: u32,
    /// How often the ring buffer is drained when no wakeup came.
    pub poll_interval_ms: u64,
    /// After this long with no TLS event, the reader stops draining every `poll_interval_ms` and
    /// sleeps until an event wakes it (the probes then wake it with the next one); 0 = never.
    pub reader_sleep_after_ms: u64,
    /// How often /proc is rescanned for newly loaded OpenSSL libraries.
    pub rescan_interval_secs: u64,
    /// Whether the kernel reports TLS libraries as they are opened (tracepoints on the open
    /// syscalls, ~0.6 us per open on the host) so they are attached at once; without it they are
    /// found by scans 0, 25, 150, 600 and 2500 ms after exec and by the rescans.
    pub attach_on_open: bool,
    /// Connections with no traffic for this long are dropped (counted as evictions).
    pub idle_timeout_secs: u64,
    /// Most connections tracked at once; the oldest idle one is evicted beyond it.
    pub max_connections: usize,
    /// Most bytes buffered over all connections.
    pub max_buffered_bytes: usize,
    /// A bypass event per (service, provider) is emitted at most once per this window.
    pub bypass_event_window_secs: u64,
    /// Calls waiting for the sink (Redis or stdout); beyond it calls are dropped and counted in
    /// `llmwarden_observer_sink_queue_drops`.
    pub sink_queue: usize,
    /// In-kernel allow-list: when set, only these process ids are captured (others cost one map
    /// lookup per SSL call, nothing is copied). Fixed at start.
    pub allow_pids: Option<Vec<u32>>,
    /// In-kernel allow-list: when set, only processes in these cgroup v2 paths (relative to
    /// `cgroup_root`, e.g. "/system.slice/billing.service") are captured. Each must exist at
    /// start; its directory inode is the kernel's cgroup id. Child cgroups are not included.
    pub allow_cgroups: Option<Vec<String>>,
    /// Where the cgroup v2 hierarchy is mounted; default: `/sys/fs/cgroup`, or
    /// `/sys/fs/cgroup/unified` on hybrid (v1 + v2) hosts.
    pub cgroup_root: Option<PathBuf>,
    /// Extra provider endpoints beside the built-in public hosts.
    pub providers: Vec<ProviderRule>,
    /// Rules mapping processes to tenant and service (first match wins).
    pub attribution: Vec<AttributionRule>,
    /// Processes never captured.
    pub exclude: Vec<Matcher>,
    /// Egress accounting: every TCP connection to a provider address (configured and built-in
    /// hosts, resolved) is accounted by a `sock/inet_sock_set_state` tracepoint, and one that
    /// carried no metered call is recorded as unmetered bypass.
    pub egress_accounting: bool,
    /// Read the TLS server name (SNI) of each provider connection from its first write, so that
    /// an unmetered connection is named by it (and one naming another site is not reported):
    /// programs on the `write`, `sendto`, `writev`, `sendmsg` and `connect` syscall tracepoints,
    /// which cost every write of every process on the host one map lookup. Default: on with
    /// `attach = "all"`, off with `attach = "on-connect"` (whose point is that processes that never
    /// call a provider pay nothing); without it, connections are named by address.
    /// docs/observer.md has the measurements.
    pub egress_server_names: Option<bool>,
    /// Processes whose provider connections are never reported as unmetered: the enforcer's own
    /// upstream connections (rustls, never decoded). Default: any executable named `enforcer`;
    /// in production name its systemd unit or cgroup instead.
    pub unmetered_ignore: Vec<Matcher>,
    /// What identifies the provider of a decoded call: `"connection"` (the default: the TLS
    /// server name the process sent on that connection is a host of the provider, or the process
    /// has a TCP connection to the provider's resolved addresses, seen by the egress accounting;
    /// a call with neither is refused and counted in
    /// `records_refused{reason="no_provider_connection"}`, so a local server sent a provider's
    /// Host header is not billed as that provider) or `"header"` (the Host / `:authority` the
    /// process sent, alone: the behaviour before).
    pub provider_identity: String,
    /// Which processes get the TLS probes: `"all"` (the default: every process's OpenSSL and Go
    /// TLS, from its exec) or `"on-connect"` (only a process the egress accounting sees open a
    /// TCP connection to a provider address, probes filtered to that process: the kernel puts no
    /// breakpoint in any other process, so HTTPS that never reaches a provider pays nothing).
    /// `on-connect` races the process's first TLS write; docs/observer.md has the measurement.
    pub attach: String,
    /// Set `/sys/kernel/rcu_expedited` while attaching probes (restored after; left alone when
    /// already on). The kernel waits for RCU grace periods inside `perf_event_open`; expedited,
    /// a new library's probes are live in 1.4–6 ms instead of 11–28 ms (host-wide) and a
    /// process's in 4–8 ms instead of 12–30 ms (on connect), so a process that calls a provider
    /// right after loading its TLS library is seen (docs/observer.md has the measurement).
    /// Expedited grace periods interrupt every CPU once.
    pub expedite_rcu: bool,
    /// Where the OpenSSL probes go: `"emulated"` (the default) puts each on the first
    /// instruction the kernel emulates instead of single-stepping, found by reading the code
    /// (past `endbr64`, or on the internal function `SSL_read`/`SSL_read_ex` both call); a hit
    /// there costs ~0.7 µs instead of ~13 µs on the VM measured (docs/observer.md, "Where the
    /// probes sit"). `"entry"` keeps them on the exported functions' first instruction, and
    /// takes Go's `(*Conn).Read` data at its `RET`s (single-stepped) instead of at its copy out.
    pub probe_sites: String,
    /// Where records that could not be written to Redis wait (fsync'd) for replay. Default
    /// `/var/lib/llmwarden/spool/observer-<hostname>-<metrics port>/`.
    pub spool_dir: Option<PathBuf>,
    /// Bound of the spool in bytes; when full, records are refused and counted. Default 256 MiB.
    pub spool_max_bytes: u64,
    /// A call reporting more tokens than this (input + output + cache) is refused, not booked,
    /// and counted in `llmwarden_observer_records_refused{reason="tokens"}`: no real call is that
    /// large, and a local process faking a provider must not be able to book it.
    pub max_tokens_per_call: u64,
    /// A call costing more than this is refused the same way (`reason="cost"`).
    pub max_cost_per_call_usd: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            redis_url: "redis://127.0.0.1:6379/".to_owned(),
            redis_password_env: None,
            redis_ca_file: None,
            // Above the largest context windows plus output (2M + 128k); the cost above a
            // 1M-token call of the dearest model in the table.
            max_tokens_per_call: 4_000_000,
            max_cost_per_call_usd: 1000.0,
            metrics_listen: "127.0.0.1:9464".to_owned(),
            prices_file: None,
            unknown_model_price: ledger::billing::DefaultPrice::default(),
            model_aliases: std::collections::BTreeMap::new(),
            // 256 KiB: the most the kernel side copies per call.
            per_call_bytes: observer_common::MAX_PER_CALL_BYTES,
            // 16 MiB: ~4000 full 4 KiB chunks, or ~15 000 small keep-alive calls (request +
            // response events): several seconds of a burst even if the reader fell behind.
            ring_buffer_bytes: 16 << 20,
            poll_interval_ms: 20,
            reader_sleep_after_ms: 1000,
            rescan_interval_secs: 5,
            attach_on_open: true,
            idle_timeout_secs: 300,
            max_connections: 10_000,
            max_buffered_bytes: 256 << 20,
            bypass_event_window_secs: 3600,
            sink_queue: 16_384,
            allow_pids: None,
            allow_cgroups: None,
            cgroup_root: None,
            providers: Vec::new(),
            attribution: Vec::new(),
            exclude: Vec::new(),
            egress_accounting: true,
            egress_server_names: None,
            provider_identity: "connection".to_owned(),
            attach: "all".to_owned(),
            expedite_rcu: true,
            probe_sites: "emulated".to_owned(),
            unmetered_ignore: vec![Matcher {
                exe: Some("*/enforcer".to_owned()),
                ..Matcher::default()
            }],
            spool_dir: None,
            spool_max_bytes: 256 << 20,
        }
    }
}

/// `[[providers]]`: an extra host (with port when not 443) and its API kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRule {
    /// "10.0.0.5:8000" or "llm.internal".
    pub host: String,
    /// "openai" | "anthropic" | "gemini" | "azure-openai" | "openai-compatible".
    pub kind: String,
    /// Provider name recorded in the ledger (default: the kind).
    pub name: Option<String>,
}

/// Process selectors; every given field must match (glob patterns).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Matcher {
    /// Process name (`/proc/PID/comm`).
    pub comm: Option<String>,
    /// Executable path.
    pub exe: Option<String>,
    /// cgroup v2 path.
    pub cgroup: Option<String>,
    /// Container id (docker, containerd, cri-o) or Kubernetes pod uid.
    pub container: Option<String>,
    /// systemd unit.
    pub unit: Option<String>,
}

/// `[[attribution]]`: a matcher and what a match means.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttributionRule {
    /// Process name glob.
    pub comm: Option<String>,
    /// Executable path glob.
    pub exe: Option<String>,
    /// cgroup path glob.
    pub cgroup: Option<String>,
    /// Container id / pod uid glob.
    pub container: Option<String>,
    /// systemd unit glob.
    pub unit: Option<String>,
    /// Tenant charged (default "unattributed").
    pub tenant: Option<String>,
    /// Service name (default: the process name).
    pub service: Option<String>,
    /// Honour the `X-Tenant-ID` / `X-Feature-Name` headers the process sends (default false). A
    /// header is only a claim: any local process can send any tenant's name, so only processes
    /// you trust to name their tenant (a multi-tenant gateway) get this; the others are billed
    /// to the rule's `tenant` whatever they send.
    pub trust_headers: bool,
}

impl AttributionRule {
    /// The selector part.
    pub fn matcher(&self) -> Matcher {
        Matcher {
            comm: self.comm.clone(),
            exe: self.exe.clone(),
            cgroup: self.cgroup.clone(),
            container: self.container.clone(),
            unit: self.unit.clone(),
        }
    }
}

impl Matcher {
    fn globs(&self) -> [(&'static str, Option<&String>); 5] {
        [
            ("comm", self.comm.as_ref()),
            ("exe", self.exe.as_ref()),
            ("cgroup", self.cgroup.as_ref()),
            ("container", self.container.as_ref()),
            ("unit", self.unit.as_ref()),
        ]
    }

    fn validate(&self, at: &str) -> Result<()> {
        let mut any = false;
        for (key, glob) in self.globs() {
            if let Some(g) = glob {
                any = true;
                globset::Glob::new(g).with_context(|| format!("{at}.{key}: invalid glob {g:?}"))?;
            }
        }
        if !any {
            bail!("{at}: give at least one of comm, exe, cgroup, container, unit");
        }
        Ok(())
    }
}

impl Config {
    /// The provider hosts the config adds (`[[providers]]`) on top of the built-in ones: what
    /// names the provider of a decoded call and of a connection's TLS server name.
    ///
    /// # Errors
    /// A `kind` that is no provider kind.
    pub fn provider_detector(&self) -> Result<ledger::provider::ProviderDetector> {
        let mut detector = ledger::provider::ProviderDetector::new();
        for p in &self.providers {
            let kind = ProviderKind::from_str(&p.kind)
                .map_err(|_| anyhow::anyhow!("providers.kind {:?}", p.kind))?;
            detector =
                detector.with_host(&p.host, kind, p.name.as_deref().unwrap_or(kind.as_str()));
        }
        Ok(detector)
    }

    /// Whether the egress programs read the TLS server names (`egress_server_names`, its default
    /// from `attach`).
    #[must_use]
    pub fn server_names(&self) -> bool {
        self.egress_server_names.unwrap_or(self.attach == "all")
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read config {} (pass --config PATH)", path.display())
        })?;
        Config::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The billing policy's part of the config (the observer records what it sees, so unknown
    /// models are billed at `unknown_model_price` rather than refused).
    #[must_use]
    pub fn pricing(&self) -> ledger::billing::PricingConfig {
        ledger::billing::PricingConfig {
            prices_file: self.prices_file.clone(),
            unknown_model: ledger::billing::UnknownModel::Allow,
            unknown_model_price: self.unknown_model_price.clone(),
            model_aliases: self.model_aliases.clone(),
            ..ledger::billing::PricingConfig::default()
        }
    }

    /// Checks every value; errors name the key and the fix.
    pub fn validate(&self) -> Result<()> {
        self.validate_redis_url()?;
        self.validate_call_caps()?;
        if !self.metrics_listen.is_empty() {
            SocketAddr::from_str(&self.metrics_listen).with_context(|| {
                format!("metrics_listen: {:?} is not IP:PORT", self.metrics_listen)
            })?;
        }
        self.validate_capture()?;
        ledger::billing::Pricing::new(ledger::PriceTable::empty(), &self.pricing())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.validate_providers()?;
        self.validate_attribution()?;
        self.validate_provider_identity()?;
        for (i, m) in self.unmetered_ignore.iter().enumerate() {
            m.validate(&format!("unmetered_ignore[{i}]"))?;
        }
        for (i, m) in self.exclude.iter().enumerate() {
            m.validate(&format!("exclude[{i}]"))?;
        }
        if self.sink_queue == 0 {
            bail!("sink_queue: must be at least 1");
        }
        self.validate_allow_lists()
    }

    /// `redis_url` names a scheme the ledger speaks.
    fn validate_redis_url(&self) -> Result<()> {
        if !self.redis_url.starts_with("redis://")
            && !self.redis_url.starts_with("rediss://")
            && !self.redis_url.starts_with("redis+cluster://")
            && !self.redis_url.starts_with("rediss+cluster://")
        {
            // The URL itself is not printed: it may carry a password.
            bail!(
                "redis_url: must start with redis://, rediss://, redis+cluster:// or \
                 rediss+cluster://"
            );
        }
        Ok(())
    }

    /// `max_tokens_per_call` and `max_cost_per_call_usd`: the bounds on one recorded call.
    fn validate_call_caps(&self) -> Result<()> {
        if self.max_tokens_per_call == 0 {
            bail!("max_tokens_per_call: must be at least 1");
        }
        ledger::Nanos::from_usd_f64(self.max_cost_per_call_usd)
            .ok()
            .filter(|n| n.get() > 0)
            .with_context(|| {
                format!(
                    "max_cost_per_call_usd: {} is not a positive USD amount",
                    self.max_cost_per_call_usd
                )
            })?;
        Ok(())
    }

    /// The kernel side's sizes and the reader's pace and bounds.
    fn validate_capture(&self) -> Result<()> {
        if self.per_call_bytes == 0 || self.per_call_bytes > observer_common::MAX_PER_CALL_BYTES {
            bail!(
                "per_call_bytes: must be 1..={}",
                observer_common::MAX_PER_CALL_BYTES
            );
        }
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < 4096 {
            bail!(
                "ring_buffer_bytes: {} must be a power of two >= 4096",
                self.ring_buffer_bytes
            );
        }
        if self.poll_interval_ms == 0 || self.poll_interval_ms > 1000 {
            bail!("poll_interval_ms: must be 1..=1000");
        }
        if self.reader_sleep_after_ms > 3_600_000 {
            bail!("reader_sleep_after_ms: must be at most 3600000 (an hour); 0 = never sleep");
        }
        if self.max_connections == 0 {
            bail!("max_connections: must be at least 1");
        }
        Ok(())
    }

    /// Each `[[providers]]` entry has a host and a known kind.
    fn validate_providers(&self) -> Result<()> {
        for (i, p) in self.providers.iter().enumerate() {
            if p.host.trim().is_empty() {
                bail!("providers[{i}].host: must not be empty");
            }
            ProviderKind::from_str(&p.kind).map_err(|_| {
                anyhow::anyhow!(
                    "providers[{i}].kind: {:?} is not one of openai, anthropic, gemini, azure-openai, openai-compatible",
                    p.kind
                )
            })?;
        }
        Ok(())
    }

    /// Each `[[attribution]]` rule matches something and names a valid tenant or service.
    fn validate_attribution(&self) -> Result<()> {
        for (i, r) in self.attribution.iter().enumerate() {
            r.matcher().validate(&format!("attribution[{i}]"))?;
            if r.tenant.is_none() && r.service.is_none() && !r.trust_headers {
                bail!("attribution[{i}]: give tenant, service and/or trust_headers = true");
            }
            for (key, v) in [("tenant", &r.tenant), ("service", &r.service)] {
                if let Some(v) = v
                    && !ledger::names::is_valid(v)
                {
                    bail!(
                        "attribution[{i}].{key}: {v:?} is not a valid name ({})",
                        ledger::names::RULE
                    );
                }
            }
        }
        Ok(())
    }

    /// `provider_identity` and `attach` are known, and on-connect has the egress accounting it
    /// needs (`provider_identity = "connection"` without it trusts TLS server names only).
    fn validate_provider_identity(&self) -> Result<()> {
        if !matches!(self.provider_identity.as_str(), "header" | "connection") {
            bail!(
                "provider_identity: {:?} is not \"header\" or \"connection\"",
                self.provider_identity
            );
        }
        if !matches!(self.probe_sites.as_str(), "emulated" | "entry") {
            bail!(
                "probe_sites: must be \"emulated\" or \"entry\", not {:?}",
                self.probe_sites
            );
        }
        if !matches!(self.attach.as_str(), "all" | "on-connect") {
            bail!("attach: {:?} is not \"all\" or \"on-connect\"", self.attach);
        }
        if self.attach == "on-connect" && !self.egress_accounting {
            bail!("attach = \"on-connect\" needs egress_accounting = true (it reacts to connects)");
        }
        Ok(())
    }

    /// `allow_pids` and `allow_cgroups`, when given, fit the kernel's allow-lists.
    fn validate_allow_lists(&self) -> Result<()> {
        if let Some(pids) = &self.allow_pids {
            if pids.is_empty() || pids.len() > ALLOW_LIST_MAX {
                bail!(
                    "allow_pids: give 1..={ALLOW_LIST_MAX} pids (omit the key to capture every process)"
                );
            }
            if let Some(i) = pids.iter().position(|&p| p == 0) {
                bail!("allow_pids[{i}]: 0 is not a process id");
            }
        }
        if let Some(cgroups) = &self.allow_cgroups {
            if cgroups.is_empty() || cgroups.len() > ALLOW_LIST_MAX {
                bail!(
                    "allow_cgroups: give 1..={ALLOW_LIST_MAX} cgroup paths (omit the key to capture every cgroup)"
                );
            }
            for (i, c) in cgroups.iter().enumerate() {
                if !c.starts_with('/') || c.split('/').any(|s| s == "..") {
                    bail!(
                        "allow_cgroups[{i}]: {c:?} must be an absolute cgroup path such as \"/system.slice/app.service\""
                    );
                }
            }
        }
        Ok(())
    }

    /// The cgroup v2 mount: `cgroup_root`, else the first of /sys/fs/cgroup and
    /// /sys/fs/cgroup/unified that is a cgroup v2 root.
    pub fn cgroup2_root(&self) -> Result<PathBuf> {
        if let Some(root) = &self.cgroup_root {
            if !root.join("cgroup.controllers").exists() {
                bail!("cgroup_root: {} is not a cgroup v2 mount", root.display());
            }
            return Ok(root.clone());
        }
        ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists())
            .context("allow_cgroups: no cgroup v2 mount found (set cgroup_root)")
    }

    /// The kernel allow-lists, with cgroup paths resolved to cgroup ids (directory inodes).
    pub fn allow_lists(&self) -> Result<AllowLists> {
        let cgroups = match &self.allow_cgroups {
            None => None,
            Some(paths) => Some({
                let root = self.cgroup2_root()?;
                paths
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let dir = root.join(c.trim_start_matches('/'));
                        std::fs::metadata(&dir)
                            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                            .with_context(|| {
                                format!("allow_cgroups[{i}]: cgroup {} not found", dir.display())
                            })
                    })
                    .collect::<Result<Vec<u64>>>()?
            }),
        };
        Ok(AllowLists {
            pids: self.allow_pids.clone(),
            cgroups,
        })
    }
}

/// Most entries of each kernel allow-list (`ALLOW_PIDS` / `ALLOW_CGROUPS` map size).
pub const ALLOW_LIST_MAX: usize = 4096;

/// Kernel filter allow-lists written at load (`allow_pids`, `allow_cgroups` in the config).
#[derive(Debug, Clone, Default)]
pub struct AllowLists {
    /// When `Some`, only these processes are captured.
    pub pids: Option<Vec<u32>>,
    /// When `Some`, only processes in these cgroups (ids = cgroup v2 directory inode) are captured.
    pub cgroups: Option<Vec<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses() {
        let cfg = Config::parse(
            r#"
            redis_url = "redis://10.0.0.1:6379/"
            metrics_listen = "127.0.0.1:9464"
            per_call_bytes = 65536
            [[providers]]
            host = "127.0.0.1:8443"
            kind = "openai"
            [[attribution]]
            unit = "billing-*.service"
            tenant = "billing"
            [[attribution]]
            comm = "python*"
            service = "notebooks"
            [[exclude]]
            exe = "/usr/bin/apt*"
            "#,
        )
        .expect("valid");
        assert_eq!(cfg.providers[0].kind, "openai");
        assert_eq!(cfg.attribution.len(), 2);
        assert_eq!(cfg.ring_buffer_bytes, 16 << 20);
        assert_eq!(cfg.allow_pids, None);
        assert_eq!(cfg.allow_cgroups, None);
    }

    #[test]
    fn allow_lists_parse_and_validate() {
        let cfg = Config::parse(
            r#"
            sink_queue = 1024
            allow_pids = [1, 4242]
            allow_cgroups = ["/", "/system.slice"]
            cgroup_root = "/sys/fs/cgroup/unified"
            "#,
        )
        .expect("valid");
        assert_eq!(cfg.sink_queue, 1024);
        assert_eq!(cfg.allow_pids, Some(vec![1, 4242]));
        assert_eq!(
            cfg.allow_cgroups,
            Some(vec!["/".to_owned(), "/system.slice".to_owned()])
        );
        assert_eq!(
            cfg.cgroup_root.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        // The root cgroup resolves to its directory inode (the kernel's cgroup id) where v2 is
        // mounted (found automatically); a missing cgroup names the key.
        let root = Config::parse("allow_cgroups = [\"/\"]").expect("valid");
        if root.cgroup2_root().is_ok() {
            let lists = root.allow_lists().expect("root cgroup exists");
            assert_eq!(lists.cgroups.as_deref().map(<[u64]>::len), Some(1));
            let missing =
                Config::parse("allow_cgroups = [\"/no-such-cgroup-llmw\"]").expect("valid");
            let e = format!("{:#}", missing.allow_lists().expect_err("missing"));
            assert!(e.contains("allow_cgroups[0]"), "{e}");
        }
        assert_eq!(
            Config::parse("")
                .expect("valid")
                .allow_lists()
                .expect("none")
                .pids,
            None
        );

        let err = |t: &str| format!("{:#}", Config::parse(t).expect_err("invalid"));
        assert!(err("allow_pids = []").contains("allow_pids"));
        assert!(err("allow_pids = [7, 0]").contains("allow_pids[1]"));
        assert!(err("allow_pids = [-1]").contains("allow_pids"));
        assert!(err("allow_cgroups = [\"system.slice\"]").contains("allow_cgroups[0]"));
        assert!(err("allow_cgroups = [\"/a/../b\"]").contains("allow_cgroups[0]"));
        assert!(err("sink_queue = 0").contains("sink_queue"));
    }

    /// The commented example names every key with a valid value.
    #[test]
    fn the_example_config_parses() {
        let c = Config::parse(include_str!("../../examples/observer.toml"))
            .expect("examples/observer.toml");
        assert_eq!(c.attach, "all");
        assert!(c.expedite_rcu);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |t: &str| format!("{:#}", Config::parse(t).expect_err("invalid"));
        assert!(err("redis = 1").contains("unknown field"));
        assert!(
            err("[[providers]]\nhost = \"x\"\nkind = \"openia\"").contains("providers[0].kind")
        );
        assert!(err("ring_buffer_bytes = 5000").contains("ring_buffer_bytes"));
        assert!(err("[[attribution]]\ntenant = \"a\"").contains("attribution[0]"));
        assert!(err("[[exclude]]\ncomm = \"[\"").contains("exclude[0].comm"));
        assert!(err("provider_identity = \"sni\"").contains("provider_identity"));
        assert!(err("[[unmetered_ignore]]\nexe = \"[\"").contains("unmetered_ignore[0].exe"));
        assert!(err("attach = \"lazy\"").contains("attach"));
        assert!(
            err("attach = \"on-connect\"\negress_accounting = false").contains("egress_accounting")
        );
        let c = Config::parse("").expect("defaults");
        assert_eq!(c.provider_identity, "connection");
        assert_eq!(c.attach, "all");
        assert_eq!(c.unmetered_ignore[0].exe.as_deref(), Some("*/enforcer"));
        assert!(err("metrics_listen = \"nope\"").contains("metrics_listen"));
        assert!(err("reader_sleep_after_ms = 3600001").contains("reader_sleep_after_ms"));
        assert!(err("probe_sites = \"exit\"").contains("probe_sites"));
        assert_eq!(c.probe_sites, "emulated");
        let entry = Config::parse("probe_sites = \"entry\"").expect("entry");
        assert_eq!(entry.probe_sites, "entry");
        assert_eq!(c.reader_sleep_after_ms, 1000);
        let never = Config::parse("reader_sleep_after_ms = 0").expect("0 = never sleep");
        assert_eq!(never.reader_sleep_after_ms, 0);
    }
}
