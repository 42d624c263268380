//! Who made a call: pid → comm, exe, cgroup → container id / pod uid, systemd unit; and the
//! config rules that turn that into a tenant and a service.

use std::path::Path;

use anyhow::Result;
use globset::{Glob, GlobMatcher};

use crate::config::{AttributionRule, Matcher};

/// Tenant charged when no rule or header names one.
pub const DEFAULT_TENANT: &str = "unattributed";

/// What /proc says about a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Thread group id.
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub comm: String,
    /// `/proc/PID/exe` target.
    pub exe: String,
    /// cgroup v2 path (or the first v1 path).
    pub cgroup: String,
    /// Container id (docker, containerd, cri-o), when the cgroup names one.
    pub container: Option<String>,
    /// Kubernetes pod uid, when the cgroup names one.
    pub pod_uid: Option<String>,
    /// systemd unit (`*.service` / `*.scope`), when the cgroup names one.
    pub unit: Option<String>,
}

impl ProcessInfo {
    /// Reads `/proc/PID/*` (under `proc_root`, normally "/proc"); gone processes give an error.
    pub fn read(proc_root: &Path, pid: u32) -> Result<ProcessInfo> {
        let dir = proc_root.join(pid.to_string());
        let comm = std::fs::read_to_string(dir.join("comm"))?
            .trim_end()
            .to_owned();
        let exe = std::fs::read_link(dir.join("exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let cgroup_file = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        let cgroup = cgroup_path(&cgroup_file);
        let (container, pod_uid, unit) = parse_cgroup(&cgroup);
        Ok(ProcessInfo {
            pid,
            comm,
            exe,
            cgroup,
            container,
            pod_uid,
            unit,
        })
    }
}

/// The cgroup v2 line ("0::/path"), else the first v1 line's path.
fn cgroup_path(file: &str) -> String {
    let mut first = None;
    for line in file.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" {
            return path.to_owned();
        }
        first.get_or_insert_with(|| path.to_owned());
    }
    first.unwrap_or_default()
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// (container id, pod uid, systemd unit) named by a cgroup path.
pub fn parse_cgroup(path: &str) -> (Option<String>, Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    let mut unit = None;
    for seg in path.split('/') {
        // docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope, or <id>.
        let core = seg.strip_suffix(".scope").unwrap_or(seg);
        let id = core.rsplit('-').next().unwrap_or(core);
        if is_hex_id(id) {
            container = Some(id.to_owned());
            continue;
        }
        // kubepods-besteffort-pod<uid with _>.slice or /kubepods/burstable/pod<uid>/
        if let Some(p) = seg
            .strip_suffix(".slice")
            .and_then(|s| s.rsplit_once("-pod"))
            .map(|(_, p)| p)
            .or_else(|| seg.strip_prefix("pod"))
            && p.len() >= 32
        {
            pod = Some(p.replace('_', "-"));
            continue;
        }
        if seg.ends_with(".service") || (seg.ends_with(".scope") && !seg.starts_with("session-")) {
            unit = Some(seg.to_owned());
        }
    }
    (container, pod, unit)
}

/// A compiled matcher: every given glob must match.
#[derive(Debug, Clone)]
pub struct CompiledMatcher {
    comm: Option<GlobMatcher>,
    exe: Option<GlobMatcher>,
    cgroup: Option<GlobMatcher>,
    container: Option<GlobMatcher>,
    unit: Option<GlobMatcher>,
}

fn glob(p: Option<&String>) -> Result<Option<GlobMatcher>> {
    Ok(match p {
        Some(p) => Some(Glob::new(p)?.compile_matcher()),
        None => None,
    })
}

impl CompiledMatcher {
    /// Compiles a config matcher (already validated).
    pub fn new(m: &Matcher) -> Result<CompiledMatcher> {
        Ok(CompiledMatcher {
            comm: glob(m.comm.as_ref())?,
            exe: glob(m.exe.as_ref())?,
            cgroup: glob(m.cgroup.as_ref())?,
            container: glob(m.container.as_ref())?,
            unit: glob(m.unit.as_ref())?,
        })
    }

    /// Whether the process matches.
    pub fn matches(&self, p: &ProcessInfo) -> bool {
        let one = |g: &Option<GlobMatcher>, v: Option<&str>| match g {
            None => true,
            Some(g) => v.is_some_and(|v| g.is_match(v)),
        };
        one(&self.comm, Some(&p.comm))
            && one(&self.exe, Some(&p.exe))
            && one(&self.cgroup, Some(&p.cgroup))
            && (self.container.is_none()
                || one(&self.container, p.container.as_deref())
                || one(&self.container, p.pod_uid.as_deref()))
            && one(&self.unit, p.unit.as_deref())
    }
}

/// Who pays for a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    /// Tenant charged.
    pub tenant: String,
    /// Service name.
    pub service: String,
    /// Feature, from the X-Feature-Name header.
    pub feature: Option<String>,
}

/// The `[[attribution]]` and `[[exclude]]` rules, compiled.
#[derive(Debug, Clone)]
pub struct Rules {
    attribution: Vec<(CompiledMatcher, AttributionRule)>,
    exclude: Vec<CompiledMatcher>,
}

impl Rules {
    /// Compiles the config's rules.
    pub fn new(attribution: &[AttributionRule], exclude: &[Matcher]) -> Result<Rules> {
        Ok(Rules {
            attribution: attribution
                .iter()
                .map(|r| Ok((CompiledMatcher::new(&r.matcher())?, r.clone())))
                .collect::<Result<_>>()?,
            exclude: exclude
                .iter()
                .map(CompiledMatcher::new)
                .collect::<Result<_>>()?,
        })
    }

    /// Whether any `[[exclude]]` rule exists.
    pub fn has_excludes(&self) -> bool {
        !self.exclude.is_empty()
    }

    /// Whether the process is excluded from capture.
    pub fn excluded(&self, p: &ProcessInfo) -> bool {
        self.exclude.iter().any(|m| m.matches(p))
    }

    /// Tenant and service for a call. The first matching rule decides: its tenant, or the
    /// `X-Tenant-ID` / `X-Feature-Name` headers when it sets `trust_headers` (a header the ledger
    /// would refuse falls back to the rule's tenant); no rule: the default tenant, headers ignored.
    pub fn attribute(
        &self,
        p: &ProcessInfo,
        tenant_header: Option<&str>,
        feature_header: Option<&str>,
    ) -> Attribution {
        let rule = self
            .attribution
            .iter()
            .find(|(m, _)| m.matches(p))
            .map(|(_, r)| r);
        // A header is honoured only for processes a rule trusts: otherwise any local process
        // could charge any tenant by naming it. One name rule with the enforcer and the ledger
        // (ledger::names): a header the ledger would refuse falls back to the rule's tenant
        // instead of losing the record.
        let trusted = rule.is_some_and(|r| r.trust_headers);
        let valid = |v: &&str| trusted && ledger::names::is_valid(v);
        let tenant = tenant_header
            .filter(valid)
            .map(str::to_owned)
            .or_else(|| rule.and_then(|r| r.tenant.clone()))
            .unwrap_or_else(|| DEFAULT_TENANT.to_owned());
        let service = rule
            .and_then(|r| r.service.clone())
            .unwrap_or_else(|| ledger::names::sanitize(&p.comm, "unknown"));
        let feature = feature_header.filter(valid).map(str::to_owned);
        Attribution {
            tenant,
            service,
            feature,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";

    #[test]
    fn container_ids_and_units_from_cgroups() {
        let docker = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(parse_cgroup(&docker).0.as_deref(), Some(ID));
        let k8s = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b3c4d_1111_2222_3333_444455556666.slice/cri-containerd-{ID}.scope"
        );
        let (c, pod, _) = parse_cgroup(&k8s);
        assert_eq!(c.as_deref(), Some(ID));
        assert_eq!(pod.as_deref(), Some("1a2b3c4d-1111-2222-3333-444455556666"));
        let v1 = format!("/kubepods/burstable/pod1a2b3c4d-1111-2222-3333-444455556666/{ID}");
        assert_eq!(
            parse_cgroup(&v1).1.as_deref(),
            Some("1a2b3c4d-1111-2222-3333-444455556666")
        );
        assert_eq!(
            parse_cgroup("/system.slice/billing.service").2.as_deref(),
            Some("billing.service")
        );
        assert_eq!(
            parse_cgroup("/user.slice/user-0.slice/session-3.scope"),
            (None, None, None)
        );
        assert_eq!(
            cgroup_path("12:pids:/a\n0::/system.slice/x.service\n"),
            "/system.slice/x.service"
        );
    }

    #[test]
    fn headers_win_then_rules_then_defaults() {
        let rules = Rules::new(
            &[AttributionRule {
                unit: Some("billing*.service".into()),
                tenant: Some("billing".into()),
                service: Some("invoicer".into()),
                trust_headers: true,
                ..AttributionRule::default()
            }],
            &[Matcher {
                comm: Some("apt*".into()),
                ..Matcher::default()
            }],
        )
        .unwrap();
        let p = ProcessInfo {
            comm: "python3".into(),
            unit: Some("billing-api.service".into()),
            ..ProcessInfo::default()
        };
        assert_eq!(rules.attribute(&p, None, None).tenant, "billing");
        assert_eq!(rules.attribute(&p, None, None).service, "invoicer");
        assert_eq!(
            rules.attribute(&p, Some("acme"), Some("chat")).tenant,
            "acme"
        );
        let other = ProcessInfo {
            comm: "node".into(),
            ..ProcessInfo::default()
        };
        let a = rules.attribute(&other, None, None);
        assert_eq!(
            (a.tenant.as_str(), a.service.as_str()),
            (DEFAULT_TENANT, "node")
        );
        // No rule trusts this process: what it claims is ignored.
        let claimed = rules.attribute(&other, Some("victim"), Some("chat"));
        assert_eq!(
            (claimed.tenant.as_str(), claimed.feature),
            (DEFAULT_TENANT, None)
        );
        assert!(rules.excluded(&ProcessInfo {
            comm: "apt-get".into(),
            ..ProcessInfo::default()
        }));
    }

    /// A rule without `trust_headers` bills its own tenant whatever the process claims: a local
    /// process cannot charge another tenant by sending its name.
    #[test]
    fn headers_count_only_for_trusted_processes() {
        let rules = Rules::new(
            &[AttributionRule {
                comm: Some("curl".into()),
                tenant: Some("team-a".into()),
                ..AttributionRule::default()
            }],
            &[],
        )
        .unwrap();
        let p = ProcessInfo {
            comm: "curl".into(),
            ..ProcessInfo::default()
        };
        let a = rules.attribute(&p, Some("victim"), Some("support-bot"));
        assert_eq!((a.tenant.as_str(), a.feature), ("team-a", None));
    }

    /// A tenant header the ledger would refuse (`|`, `*`, braces, spaces) never reaches it: the
    /// call is billed to the rule's tenant instead of being refused and lost; a comm with
    /// characters outside the name rule becomes a valid service name.
    #[test]
    fn names_the_ledger_refuses_fall_back() {
        let rules = Rules::new(
            &[AttributionRule {
                comm: Some("py*".into()),
                tenant: Some("billing".into()),
                trust_headers: true,
                ..AttributionRule::default()
            }],
            &[],
        )
        .unwrap();
        let p = ProcessInfo {
            comm: "python3".into(),
            ..ProcessInfo::default()
        };
        for bad in ["a|b", "*", "x{y}", "two words"] {
            let a = rules.attribute(&p, Some(bad), Some(bad));
            assert_eq!(a.tenant, "billing", "{bad}");
            assert_eq!(a.feature, None, "{bad}");
            assert!(ledger::names::check(ledger::names::NameKind::Tenant, &a.tenant).is_ok());
        }
        let odd = ProcessInfo {
            comm: "kworker/0:1 x".into(),
            ..ProcessInfo::default()
        };
        let a = rules.attribute(&odd, None, None);
        assert_eq!(a.service, "kworker_0:1_x");
        assert!(ledger::names::is_valid(&a.service));
    }
}
