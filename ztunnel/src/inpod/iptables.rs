//! The capture rules istio-cni installs inside a pod's network namespace (iptables variant).
//!
//! ztunnel itself never installs these in production — istio-cni does — but the rules are half of
//! the in-pod contract, so they live here for local runs (no CNI) and for the namespace tests that
//! prove the other half (listeners, marks, `SO_ORIGINAL_DST`) works against them.
//!
//! What they do, per packet in the pod:
//! - outgoing TCP from the app → `REDIRECT` to 15001 (nat `OUTPUT`);
//! - incoming TCP to 15008 → `TPROXY` to the in-pod 15008 listener, any other incoming TCP →
//!   `TPROXY` to 15006 (mangle `PREROUTING`); TPROXY marks them 0x111 and policy routing
//!   (`fwmark 0x111 → table 100: local 0.0.0.0/0 dev lo`, and `::/0`) delivers them locally;
//! - anything marked [`ZTUNNEL_MARK`] (ztunnel's own sockets) and kubelet probes (SNATed to
//!   169.254.7.127, or fd16:9254:7127:1337:ffff:ffff:ffff:ffff, on the node) pass untouched;
//!   replies to TPROXYed connections get their mark back from the connmark so they route the
//!   same way.
//!
//! - DNS queries (UDP and TCP port 53, not to the pod's loopback) → `REDIRECT` to ztunnel's DNS
//!   proxy on 15053 (nat `OUTPUT`), unless DNS capture is off ([`PodRules::capturing_dns`]), as
//!   with istio-cni's `DNS_CAPTURE`. The proxy's own forwarded queries leave from the pod's
//!   namespace too, marked, so these rules let them through; and, as istio-cni does, the raw
//!   table tracks them and the answers from port 53 in conntrack zone 1. Both the pod and the
//!   proxy ask the same resolver from the same address, so without the zone a proxy query could
//!   reuse the un-redirected conntrack entry of a pod query on the same source port (or the
//!   reverse), and the pod's query would skip the proxy or the proxy's come back to it.
//!
//! The same rules are installed with ip6tables wherever the namespace has IPv6 on, as istio-cni
//! does on dual-stack clusters (with the IPv6 probe source and loopback), and the policy route
//! with `ip -6`; IPv6 DNS goes to the DNS proxy on the pod's IPv6 loopback.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use tracing::{debug, info, warn};

use super::socket::ZTUNNEL_MARK;
use super::{DNS_PORT, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, NetNs, OUTBOUND_PORT};

/// The mark TPROXY puts on captured inbound packets; selects the local-delivery routing table.
const TPROXY_MARK: u32 = 0x111;
/// Only the low 12 bits of the mark are Istio's; other CNIs use the rest.
const MARK_MASK: u32 = 0xfff;
/// Routing table for TPROXYed packets: everything is local.
const ROUTE_TABLE: &str = "100";
/// `ip rule` priority istio-cni uses for the TPROXY rule.
const RULE_PREF: &str = "32764";
/// An address family the rules are written for: the same rules, with each family's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The pod's loopback.
    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.1/32",
            Self::V6 => "::1/128",
        }
    }

    /// The source the node SNATs kubelet health probes to, so the pod rules can let them
    /// through (istio-cni's, for each family).
    fn probe_source(self) -> &'static str {
        match self {
            Self::V4 => "169.254.7.127/32",
            Self::V6 => "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128",
        }
    }

    /// TPROXY's `--on-ip` for "the packet's own destination".
    fn any(self) -> &'static str {
        match self {
            Self::V4 => "0.0.0.0",
            Self::V6 => "::",
        }
    }

    /// `ip`'s family option.
    fn ip(self) -> &'static str {
        match self {
            Self::V4 => "-4",
            Self::V6 => "-6",
        }
    }
}
/// How long iptables may wait for the xtables lock another program holds (legacy backend).
const LOCK_WAIT_SECS: &str = "5";

/// Our chains: (table, chain). Created, flushed and deleted only by us. The raw table's exist
/// only while DNS is captured.
const CHAINS: [(&str, &str); 5] = [
    ("mangle", "ISTIO_PRERT"),
    ("mangle", "ISTIO_OUTPUT"),
    ("nat", "ISTIO_OUTPUT"),
    ("raw", "ISTIO_OUTPUT"),
    ("raw", "ISTIO_PRERT"),
];

/// Jumps from the built-in chains into ours: (table, built-in chain, our chain).
const JUMPS: [(&str, &str, &str); 5] = [
    ("mangle", "PREROUTING", "ISTIO_PRERT"),
    ("mangle", "OUTPUT", "ISTIO_OUTPUT"),
    ("nat", "OUTPUT", "ISTIO_OUTPUT"),
    ("raw", "PREROUTING", "ISTIO_PRERT"),
    ("raw", "OUTPUT", "ISTIO_OUTPUT"),
];

/// Every table we program.
const TABLES: [&str; 3] = ["mangle", "nat", "raw"];

/// The conntrack zone of the DNS proxy's forwarded queries and of answers from port 53.
const DNS_CT_ZONE: u16 = 1;

/// Which iptables implementation programs a namespace.
///
/// Both ship in the same package on current distributions (`iptables-nft` and `iptables-legacy`)
/// and program different kernel subsystems; rules of both apply, so mixing them in one namespace
/// works but is confusing to debug. [`IptablesBackend::detect`] picks one per namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptablesBackend {
    /// nf_tables through the iptables syntax (`iptables-nft-*`): the default on current distros.
    Nft,
    /// The original x_tables (`iptables-legacy-*`): still what older nodes and images use.
    Legacy,
}

// === impl IptablesBackend ===

impl IptablesBackend {
    fn save_program(self, family: Family) -> &'static str {
        match (self, family) {
            (Self::Nft, Family::V4) => "iptables-nft-save",
            (Self::Legacy, Family::V4) => "iptables-legacy-save",
            (Self::Nft, Family::V6) => "ip6tables-nft-save",
            (Self::Legacy, Family::V6) => "ip6tables-legacy-save",
        }
    }

    fn restore_program(self, family: Family) -> &'static str {
        match (self, family) {
            (Self::Nft, Family::V4) => "iptables-nft-restore",
            (Self::Legacy, Family::V4) => "iptables-legacy-restore",
            (Self::Nft, Family::V6) => "ip6tables-nft-restore",
            (Self::Legacy, Family::V6) => "ip6tables-legacy-restore",
        }
    }

    /// The backends whose IPv4 programs are on `PATH`, nft first.
    pub fn installed() -> Vec<Self> {
        [Self::Nft, Self::Legacy]
            .into_iter()
            .filter(|b| b.has(Family::V4))
            .collect()
    }

    /// Whether this backend's programs for `family` are on `PATH`.
    fn has(self, family: Family) -> bool {
        on_path(self.save_program(family)) && on_path(self.restore_program(family))
    }

    /// Picks the backend for `netns`, in this order:
    /// 1. the only installed one;
    /// 2. the one that already has rules in the namespace (ours from an earlier install, or the
    ///    pod's), so a reinstall or [`PodRules::remove`] touches the same rules;
    /// 3. the one plain `iptables` resolves to (the distribution's or the admin's choice);
    /// 4. nft.
    pub fn detect(netns: &NetNs) -> Result<Self, RulesError> {
        let installed = Self::installed();
        match installed.as_slice() {
            [] => return Err(RulesError::NotInstalled),
            [only] => return Ok(*only),
            _ => {}
        }
        let in_use = netns
            .run_in(|| -> Result<Vec<Self>, RulesError> {
                let mut in_use = Vec::new();
                for backend in &installed {
                    let saved = run(Command::new(backend.save_program(Family::V4)), None)?;
                    if saved.lines().any(|l| l.starts_with("-A ")) {
                        in_use.push(*backend);
                    }
                }
                Ok(in_use)
            })
            .map_err(RulesError::Netns)??;
        if let [only] = in_use.as_slice() {
            return Ok(*only);
        }
        let default = Command::new("iptables").arg("--version").output();
        Ok(match default {
            Ok(out) if String::from_utf8_lossy(&out.stdout).contains("legacy") => Self::Legacy,
            _ => Self::Nft,
        })
    }
}

/// The in-pod capture rules of one pod network namespace.
///
/// [`PodRules::install`] is idempotent: our chains are flushed and refilled in one
/// `iptables-restore --noflush` transaction per table, so a reinstall never leaves a window where
/// the pod is half captured, and the jumps into them are added only when missing. Rules other
/// programs own in the namespace are left alone.
#[derive(Clone, Debug)]
pub struct PodRules {
    backend: IptablesBackend,
    dns: bool,
    ipv6: bool,
}

/// Why installing or removing the pod rules failed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Neither `iptables-nft-restore` nor `iptables-legacy-restore` is on `PATH`.
    #[error(
        "no iptables found on PATH (need iptables-nft-save/-restore or iptables-legacy-save/-restore); install the iptables package"
    )]
    NotInstalled,
    /// The backend's ip6tables programs are not on `PATH`, for a namespace with IPv6.
    #[error(
        "no ip6tables found on PATH for the pod's IPv6 (need {0}); install the iptables package"
    )]
    NoIpv6Programs(&'static str),
    /// A command could not be started at all.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line, and for `iptables-restore` the input line it rejected.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it wrote to stderr, trimmed.
        stderr: String,
    },
    /// The namespace could not be entered.
    #[error("could not enter the pod network namespace: {0}")]
    Netns(#[source] io::Error),
}

// === impl PodRules ===

impl PodRules {
    /// Rules programmed with `backend`, DNS capture included, IPv6 too where the namespace has
    /// it.
    pub fn new(backend: IptablesBackend) -> Self {
        Self {
            backend,
            dns: true,
            ipv6: true,
        }
    }

    /// The same rules, for IPv6 as well where the namespace has it, or IPv4 only (istio-cni's
    /// `ENABLE_INBOUND_IPV6`, Helm's `ambient.ipv6`). An IPv4-only cluster may turn it off; with
    /// it on, a namespace whose kernel cannot take IPv6 rules still gets IPv4's unless the pod
    /// has an IPv6 address of its own, which would then escape capture.
    pub fn capturing_ipv6(self, ipv6: bool) -> Self {
        Self { ipv6, ..self }
    }

    /// The same rules, redirecting the pod's DNS to ztunnel's DNS proxy or not.
    pub fn capturing_dns(self, dns: bool) -> Self {
        Self { dns, ..self }
    }

    /// Rules programmed with the backend [`IptablesBackend::detect`] picks for `netns`.
    pub fn detect(netns: &NetNs) -> Result<Self, RulesError> {
        IptablesBackend::detect(netns).map(Self::new)
    }

    /// The backend these rules are programmed with.
    pub fn backend(&self) -> IptablesBackend {
        self.backend
    }

    /// Installs (or refreshes) the capture rules and the TPROXY policy route in `netns`.
    ///
    /// Blocking: it runs `iptables-*-save`, `iptables-*-restore`, their ip6tables twins and
    /// `ip` inside the namespace. On error what was installed is removed again, so a pod is
    /// never left half captured (its outbound redirected to a port nothing serves yet).
    pub fn install(&self, netns: &NetNs) -> Result<(), RulesError> {
        netns
            .run_in(|| {
                self.install_here().inspect_err(|_| {
                    if let Err(e) = self.remove_here() {
                        warn!(error = %e, "pod capture rules not cleaned up after a failed install");
                    }
                })
            })
            .map_err(RulesError::Netns)??;
        info!(netns = netns.inode(), backend = ?self.backend, "pod capture rules installed");
        Ok(())
    }

    /// Removes what [`PodRules::install`] added; a no-op for anything already gone.
    pub fn remove(&self, netns: &NetNs) -> Result<(), RulesError> {
        netns
            .run_in(|| self.remove_here())
            .map_err(RulesError::Netns)??;
        info!(netns = netns.inode(), backend = ?self.backend, "pod capture rules removed");
        Ok(())
    }

    fn install_here(&self) -> Result<(), RulesError> {
        self.install_family(Family::V4)?;
        if !self.ipv6 || !ipv6_here() {
            return Ok(());
        }
        let installed = if self.backend.has(Family::V6) {
            self.install_family(Family::V6)
        } else {
            let programs = self.backend.restore_program(Family::V6);
            Err(RulesError::NoIpv6Programs(programs))
        };
        match installed {
            Err(e) if !global_ipv6_here() => {
                // Nothing of the pod's own would escape: its IPv4 capture is whole.
                warn!(error = %e, "IPv6 capture rules not installed; the pod has no IPv6 address");
                let _ = self.remove_family(Family::V6);
                Ok(())
            }
            installed => installed,
        }
    }

    fn install_family(&self, family: Family) -> Result<(), RulesError> {
        let saved = run(Command::new(self.backend.save_program(family)), None)?;
        let current = Saved::parse(&saved);
        let script = install_script(&current, family, self.dns);
        debug!(backend = ?self.backend, ?family, %script, "iptables-restore input");
        run(self.restore(family), Some(&script))?;

        let rule = rule_args();
        if tproxy_rules(family)? == 0 {
            let mut add = Command::new("ip");
            add.args([family.ip(), "rule", "add"]).args(&rule);
            run(add, None)?;
        }
        let mut route = Command::new("ip");
        route
            .args([family.ip(), "route", "replace"])
            .args(route_args(family));
        run(route, None)?;
        Ok(())
    }

    fn remove_here(&self) -> Result<(), RulesError> {
        self.remove_family(Family::V4)?;
        if ipv6_here() && self.backend.has(Family::V6) {
            self.remove_family(Family::V6)?;
        }
        Ok(())
    }

    fn remove_family(&self, family: Family) -> Result<(), RulesError> {
        let saved = run(Command::new(self.backend.save_program(family)), None)?;
        if let Some(script) = remove_script(&Saved::parse(&saved)) {
            debug!(backend = ?self.backend, ?family, %script, "iptables-restore input");
            run(self.restore(family), Some(&script))?;
        }

        let rule = rule_args();
        // A rule added twice by hand shows twice; delete every copy.
        for _ in 0..tproxy_rules(family)? {
            let mut del = Command::new("ip");
            del.args([family.ip(), "rule", "del"]).args(&rule);
            run(del, None)?;
        }
        let mut show = Command::new("ip");
        show.args([family.ip(), "route", "show", "table", ROUTE_TABLE]);
        // On recent kernels a table that never existed is an error, not an empty listing.
        let present = run(show, None).is_ok_and(|out| {
            out.lines()
                .any(|l| l.starts_with("local default ") && l.contains(" dev lo "))
        });
        if present {
            let mut del = Command::new("ip");
            del.args([family.ip(), "route", "del"])
                .args(route_args(family));
            run(del, None)?;
        }
        Ok(())
    }

    fn restore(&self, family: Family) -> Command {
        let mut cmd = Command::new(self.backend.restore_program(family));
        cmd.args(["--noflush", "--wait", LOCK_WAIT_SECS]);
        cmd
    }
}

/// Whether the calling thread's namespace has IPv6 on (not turned off with
/// `net.ipv6.conf.all.disable_ipv6`, nor absent from the kernel).
fn ipv6_here() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|off| off.trim() == "0")
}

/// Whether an interface of the calling thread's namespace has a global IPv6 address (scope 0 in
/// `if_inet6`, read through `thread-self`: `/proc/net` is the process's namespace, not the
/// thread's).
fn global_ipv6_here() -> bool {
    std::fs::read_to_string("/proc/thread-self/net/if_inet6").is_ok_and(|table| {
        table
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some("00"))
    })
}

/// `ip rule` selector and action for TPROXYed packets.
fn rule_args() -> [String; 6] {
    [
        "fwmark".to_owned(),
        mark(TPROXY_MARK),
        "pref".to_owned(),
        RULE_PREF.to_owned(),
        "lookup".to_owned(),
        ROUTE_TABLE.to_owned(),
    ]
}

/// How many copies of our `ip rule` exist for `family`. Parsed from the full listing rather than
/// with `ip rule show <selector>`: older iproute2 ignores the selector and lists everything.
fn tproxy_rules(family: Family) -> Result<usize, RulesError> {
    let mut show = Command::new("ip");
    show.args([family.ip(), "rule", "show"]);
    Ok(count_tproxy_rules(&run(show, None)?))
}

fn count_tproxy_rules(listing: &str) -> usize {
    let selector = format!("from all fwmark {} lookup {ROUTE_TABLE}", mark(TPROXY_MARK));
    listing
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(pref, rest)| pref.trim() == RULE_PREF && rest.trim() == selector)
        .count()
}

/// The route that makes every TPROXYed packet of `family` local.
fn route_args(family: Family) -> [&'static str; 6] {
    let all = match family {
        Family::V4 => "0.0.0.0/0",
        Family::V6 => "::/0",
    };
    ["local", all, "dev", "lo", "table", ROUTE_TABLE]
}

fn mark(value: u32) -> String {
    format!("{value:#x}/{MARK_MASK:#x}")
}

/// The rules of our chains for `family`, in order, as `iptables-save` would print them (without
/// `-A CHAIN`).
fn chain_rules(family: Family, dns: bool) -> Vec<(&'static str, &'static str, String)> {
    let ours = mark(ZTUNNEL_MARK);
    let tproxy = mark(TPROXY_MARK);
    let (lo, probe, any) = (family.loopback(), family.probe_source(), family.any());
    let dns_rules = [
        (
            "nat",
            "ISTIO_OUTPUT",
            format!(
                "! -o lo -p udp -m mark ! --mark {ours} -m udp --dport 53 \
                 -j REDIRECT --to-ports {DNS_PORT}"
            ),
        ),
        (
            "nat",
            "ISTIO_OUTPUT",
            format!(
                "! -d {lo} -p tcp -m tcp --dport 53 -m mark ! --mark {ours} \
                 -j REDIRECT --to-ports {DNS_PORT}"
            ),
        ),
        (
            "raw",
            "ISTIO_OUTPUT",
            format!("-p udp -m mark --mark {ours} -m udp --dport 53 -j CT --zone {DNS_CT_ZONE}"),
        ),
        (
            "raw",
            "ISTIO_PRERT",
            format!("-p udp -m mark ! --mark {ours} -m udp --sport 53 -j CT --zone {DNS_CT_ZONE}"),
        ),
    ];
    let mut rules = vec![
        // Connections ztunnel makes keep their TPROXY mark on replies (see the mangle OUTPUT rule).
        (
            "mangle",
            "ISTIO_PRERT",
            format!("-m mark --mark {ours} -j CONNMARK --set-xmark {tproxy}"),
        ),
        (
            "mangle",
            "ISTIO_PRERT",
            format!("-s {probe} -p tcp -m tcp -j ACCEPT"),
        ),
        // Locally generated traffic already went through nat OUTPUT; do not TPROXY it again.
        (
            "mangle",
            "ISTIO_PRERT",
            format!("! -d {lo} -i lo -p tcp -j ACCEPT"),
        ),
        (
            "mangle",
            "ISTIO_PRERT",
            format!(
                "-p tcp -m tcp --dport {INBOUND_HBONE_PORT} -m mark ! --mark {ours} \
                 -j TPROXY --on-port {INBOUND_HBONE_PORT} --on-ip {any} --tproxy-mark {tproxy}"
            ),
        ),
        // Flows that existed before capture started are not taken over mid-stream.
        (
            "mangle",
            "ISTIO_PRERT",
            "-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
        ),
        (
            "mangle",
            "ISTIO_PRERT",
            format!(
                "! -d {lo} -p tcp -m mark ! --mark {ours} \
                 -j TPROXY --on-port {INBOUND_PLAINTEXT_PORT} --on-ip {any} --tproxy-mark {tproxy}"
            ),
        ),
        (
            "mangle",
            "ISTIO_OUTPUT",
            format!(
                "-m connmark --mark {tproxy} -j CONNMARK --restore-mark \
                 --nfmask 0xffffffff --ctmask 0xffffffff"
            ),
        ),
        (
            "nat",
            "ISTIO_OUTPUT",
            format!("-d {probe} -p tcp -m tcp -j ACCEPT"),
        ),
    ];
    if dns {
        rules.extend(dns_rules);
    }
    rules.extend([
        (
            "nat",
            "ISTIO_OUTPUT",
            format!("-p tcp -m mark --mark {tproxy} -j ACCEPT"),
        ),
        ("nat", "ISTIO_OUTPUT", format!("! -d {lo} -o lo -j ACCEPT")),
        (
            "nat",
            "ISTIO_OUTPUT",
            format!(
                "! -d {lo} -p tcp -m mark ! --mark {ours} \
                 -j REDIRECT --to-ports {OUTBOUND_PORT}"
            ),
        ),
    ]);
    rules
}

/// What `iptables-save` says exists: chains and rules, per table.
#[derive(Debug, Default)]
struct Saved {
    chains: HashSet<(String, String)>,
    /// (table, the rule line as printed, e.g. `-A OUTPUT -j ISTIO_OUTPUT`).
    rules: Vec<(String, String)>,
}

impl Saved {
    fn parse(save: &str) -> Self {
        let mut saved = Self::default();
        let mut table = String::new();
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                name.clone_into(&mut table);
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    saved.chains.insert((table.clone(), chain.to_owned()));
                }
            } else if line.starts_with("-A ") {
                saved.rules.push((table.clone(), line.to_owned()));
            }
        }
        saved
    }

    fn has_chain(&self, table: &str, chain: &str) -> bool {
        self.chains.contains(&(table.to_owned(), chain.to_owned()))
    }

    fn count(&self, table: &str, rule: &str) -> usize {
        self.rules
            .iter()
            .filter(|(t, r)| t == table && r == rule)
            .count()
    }
}

fn jump_rule(from: &str, to: &str) -> String {
    format!("-A {from} -j {to}")
}

/// `iptables-restore --noflush` input for `family` that (re)creates our chains and adds missing
/// jumps; the raw table's chains only with `dns`, and without it any left from an earlier
/// install are removed.
fn install_script(current: &Saved, family: Family, dns: bool) -> String {
    let rules = chain_rules(family, dns);
    let mut script = String::new();
    for table in TABLES {
        if table == "raw" && !dns {
            script.push_str(&removal(current, table));
            continue;
        }
        script.push_str(&format!("*{table}\n"));
        // Declaring a chain in --noflush mode creates it, or flushes it if it exists.
        for (_, chain) in CHAINS.iter().filter(|(t, _)| *t == table) {
            script.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for (_, chain, rule) in rules.iter().filter(|(t, _, _)| *t == table) {
            script.push_str(&format!("-A {chain} {rule}\n"));
        }
        for (_, from, to) in JUMPS.iter().filter(|(t, _, _)| *t == table) {
            let jump = jump_rule(from, to);
            if current.count(table, &jump) == 0 {
                script.push_str(&jump);
                script.push('\n');
            }
        }
        script.push_str("COMMIT\n");
    }
    script
}

/// `iptables-restore --noflush` input that deletes our jumps and chains, if any exist.
fn remove_script(current: &Saved) -> Option<String> {
    let script: String = TABLES.iter().map(|t| removal(current, t)).collect();
    (!script.is_empty()).then_some(script)
}

/// The part of a restore script that deletes our jumps and chains in `table`; empty when none
/// exist.
fn removal(current: &Saved, table: &str) -> String {
    let mut body = String::new();
    for (_, from, to) in JUMPS.iter().filter(|(t, _, _)| *t == table) {
        let jump = jump_rule(from, to);
        for _ in 0..current.count(table, &jump) {
            body.push_str(&format!("-D {from} -j {to}\n"));
        }
    }
    for (_, chain) in CHAINS
        .iter()
        .filter(|(t, c)| *t == table && current.has_chain(t, c))
    {
        // Flush first: a chain with rules cannot be deleted.
        body.push_str(&format!(":{chain} - [0:0]\n-X {chain}\n"));
    }
    if body.is_empty() {
        return body;
    }
    format!("*{table}\n{body}COMMIT\n")
}

/// Runs `cmd` (in the calling thread's namespace) and returns its stdout.
fn run(mut cmd: Command, stdin: Option<&str>) -> Result<String, RulesError> {
    // Error messages are matched by humans, but keep them in one language in the logs.
    cmd.env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = CommandLine(&cmd).to_string();
    let spawn_err = |source| RulesError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // The inputs are a few KiB, below the pipe buffer, so writing before reading cannot block.
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let command = match stdin.and_then(|input| rejected_line(&stderr, input)) {
            Some(line) => format!("{command} (input line: {line})"),
            None => command,
        };
        return Err(RulesError::Failed {
            command,
            status: out.status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `iptables-restore` reports "Error occurred at line: N" (older versions "line N failed"); the
/// line itself is what the operator needs. nft rejects some rules only at `COMMIT`, and then that
/// is the line reported.
fn rejected_line<'a>(stderr: &str, input: &'a str) -> Option<&'a str> {
    stderr.match_indices("line").find_map(|(at, word)| {
        let after = stderr[at + word.len()..].trim_start_matches([':', ' ']);
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        let n: usize = digits.parse().ok()?;
        input.lines().nth(n.checked_sub(1)?)
    })
}

/// Displays a command as a shell would show it.
struct CommandLine<'a>(&'a Command);

impl fmt::Display for CommandLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.get_program().to_string_lossy())?;
        for arg in self.0.get_args() {
            write!(f, " {}", arg.to_string_lossy())?;
        }
        Ok(())
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| Path::new(&dir).join(program).is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules as istio-cni's iptables goldens print them (in-pod, IPv4, DNS capture off).
    const GOLDEN: &str = "\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -i lo -p tcp -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15008 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
*nat
:ISTIO_OUTPUT - [0:0]
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
";

    #[test]
    fn fresh_install_matches_golden() {
        assert_eq!(install_script(&Saved::default(), Family::V4, false), GOLDEN);
    }

    /// IPv6's rules are IPv4's with IPv6's loopback, probe source and wildcard, as istio-cni's
    /// ip6tables goldens print them.
    #[test]
    fn ipv6_rules_are_ipv4_s_with_ipv6_addresses() {
        let want = GOLDEN
            .replace("127.0.0.1/32", "::1/128")
            .replace(
                "169.254.7.127/32",
                "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128",
            )
            .replace("--on-ip 0.0.0.0", "--on-ip ::");
        assert_eq!(install_script(&Saved::default(), Family::V6, false), want);
        let v4_dns = install_script(&Saved::default(), Family::V4, true);
        let v6_dns = install_script(&Saved::default(), Family::V6, true);
        assert_eq!(
            v6_dns,
            v4_dns
                .replace("127.0.0.1/32", "::1/128")
                .replace(
                    "169.254.7.127/32",
                    "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128"
                )
                .replace("--on-ip 0.0.0.0", "--on-ip ::"),
            "DNS capture the same for IPv6"
        );
    }

    #[test]
    fn dns_capture_adds_istio_cnis_redirects_and_conntrack_zone() {
        let probe = "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT\n";
        let dns = "\
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
";
        let raw = "\
*raw
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1
-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
";
        let want = GOLDEN.replace(probe, &format!("{probe}{dns}")) + raw;
        assert_eq!(install_script(&Saved::default(), Family::V4, true), want);
    }

    #[test]
    fn turning_dns_capture_off_removes_the_conntrack_zone() {
        let save = "\
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1
COMMIT
";
        let script = install_script(&Saved::parse(save), Family::V4, false);
        let removal = "\
*raw
-D PREROUTING -j ISTIO_PRERT
-D OUTPUT -j ISTIO_OUTPUT
:ISTIO_OUTPUT - [0:0]
-X ISTIO_OUTPUT
:ISTIO_PRERT - [0:0]
-X ISTIO_PRERT
COMMIT
";
        assert_eq!(script, format!("{GOLDEN}{removal}"));
    }

    #[test]
    fn reinstall_does_not_duplicate_jumps() {
        let save = "\
# Generated by iptables-nft-save
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
-A ISTIO_OUTPUT -j ACCEPT
COMMIT
";
        let script = install_script(&Saved::parse(save), Family::V4, false);
        assert!(!script.contains("-A PREROUTING"), "{script}");
        assert!(
            !script.contains("-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n*nat"),
            "{script}"
        );
        // The nat jump is missing (only a rule inside the chain exists), so it is added.
        assert!(
            script.ends_with("-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"),
            "{script}"
        );
    }

    #[test]
    fn remove_deletes_only_what_exists() {
        assert_eq!(remove_script(&Saved::default()), None);
        let save = "\
*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A PREROUTING -j ISTIO_PRERT
-A PREROUTING -j KUBE-SOMETHING
COMMIT
";
        let script = remove_script(&Saved::parse(save)).expect("something to remove");
        assert_eq!(
            script,
            "*mangle\n-D PREROUTING -j ISTIO_PRERT\n-D PREROUTING -j ISTIO_PRERT\n\
             :ISTIO_PRERT - [0:0]\n-X ISTIO_PRERT\nCOMMIT\n"
        );
    }

    #[test]
    fn tproxy_rule_is_found_in_the_listing() {
        let listing = "0:\tfrom all lookup local\n\
                       32764:\tfrom all fwmark 0x111/0xfff lookup 100\n\
                       32764:\tfrom all fwmark 0x111/0xfff lookup 100\n\
                       32765:\tfrom all fwmark 0x111/0xfff lookup 100\n\
                       32766:\tfrom all lookup main\n";
        assert_eq!(count_tproxy_rules(listing), 2);
        assert_eq!(count_tproxy_rules("32766:\tfrom all lookup main\n"), 0);
    }

    #[test]
    fn routing_arguments() {
        assert_eq!(
            rule_args().join(" "),
            "fwmark 0x111/0xfff pref 32764 lookup 100"
        );
        assert_eq!(
            route_args(Family::V4).join(" "),
            "local 0.0.0.0/0 dev lo table 100"
        );
        assert_eq!(
            route_args(Family::V6).join(" "),
            "local ::/0 dev lo table 100"
        );
    }

    #[test]
    fn restore_errors_name_the_rejected_line() {
        let input = "*nat\n:ISTIO_OUTPUT - [0:0]\n-A ISTIO_OUTPUT -j BOGUS\nCOMMIT\n";
        let stderr = "iptables-restore v1.8.9 (legacy): Couldn't load target `BOGUS'\n\nError occurred at line: 3\nTry `iptables-restore -h' for more information.";
        assert_eq!(
            rejected_line(stderr, input),
            Some("-A ISTIO_OUTPUT -j BOGUS")
        );
        assert_eq!(
            rejected_line("iptables-restore: line 2 failed", input),
            Some(":ISTIO_OUTPUT - [0:0]")
        );
        assert_eq!(rejected_line("no line number here", input), None);
    }

    #[test]
    fn failed_command_reports_command_and_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo nope >&2; exit 3"]);
        let err = run(cmd, None).expect_err("exit 3");
        let msg = err.to_string();
        assert!(msg.contains("`sh -c echo nope >&2; exit 3`"), "{msg}");
        assert!(msg.contains("nope"), "{msg}");

        let err = run(Command::new("ztunnel-test-no-such-program"), None).expect_err("missing");
        assert!(matches!(err, RulesError::Spawn { .. }), "{err}");
    }
}
