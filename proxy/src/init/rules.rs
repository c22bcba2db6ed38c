//! The redirect rules of `weft-proxy init`, generated as `iptables-restore` input. Pure: no
//! process is run here, so every rule is unit-tested as text.
//!
//! ```text
//!  PREROUTING ─▶ WEFT_INBOUND ── skip-inbound port ─▶ RETURN (straight to the app)
//!                    └──────────▶ WEFT_INBOUND_REDIRECT ─▶ REDIRECT :inbound-port
//!
//!  OUTPUT ─▶ WEFT_OUTBOUND ── proxy UID, from 127.0.0.6 (::6), out lo ─▶ RETURN
//!                 │           (the inbound side handing a connection to the app)
//!                 ├─ proxy UID, out lo, not to 127/8 (::1) ─▶ WEFT_INBOUND
//!                 │           (the proxy dialling its own pod: through the inbound side)
//!                 ├─ proxy UID ───────────────────▶ RETURN (no loop)
//!                 ├─ to 127.0.0.0/8 (::1) ────────▶ RETURN (loopback stays local)
//!                 ├─ skip-outbound port / CIDR ───▶ RETURN
//!                 └──────────▶ WEFT_OUTBOUND_REDIRECT ─▶ REDIRECT :outbound-port
//! ```
//!
//! Only TCP is redirected. Weft's four chains are flushed and refilled on every run
//! (`iptables-restore --noflush` flushes a chain it declares), and the two jumps into them
//! from the built-in chains are added only when [`missing_jumps`] says they are absent, so a
//! second run leaves the table as it was.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    num::NonZeroU16,
    str::FromStr,
};

/// Weft's chain that PREROUTING jumps to: inbound exceptions, then the inbound redirect.
pub const INBOUND_CHAIN: &str = "WEFT_INBOUND";
/// Weft's chain that redirects to the proxy's inbound port.
pub const INBOUND_REDIRECT_CHAIN: &str = "WEFT_INBOUND_REDIRECT";
/// Weft's chain that OUTPUT jumps to: outbound exceptions, then the outbound redirect.
pub const OUTBOUND_CHAIN: &str = "WEFT_OUTBOUND";
/// Weft's chain that redirects to the proxy's outbound port.
pub const OUTBOUND_REDIRECT_CHAIN: &str = "WEFT_OUTBOUND_REDIRECT";

/// An IP family; each gets its own rules and its own binaries (`iptables`, `ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4, `iptables`.
    V4,
    /// IPv6, `ip6tables`.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The whole loopback range of this family: never redirected when the app dials it.
    pub fn loopback(self) -> Cidr {
        match self {
            Family::V4 => Cidr {
                addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                prefix: 8,
            },
            Family::V6 => Cidr {
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                prefix: 128,
            },
        }
    }

    /// The source address of the proxy's inbound side when it dials the application on
    /// the pod's own address ([`crate::server::INBOUND_SOURCE_V4`] / `_V6`), as a host
    /// network.
    pub fn inbound_source(self) -> Cidr {
        match self {
            Family::V4 => Cidr {
                addr: IpAddr::V4(crate::server::INBOUND_SOURCE_V4),
                prefix: 32,
            },
            Family::V6 => Cidr {
                addr: IpAddr::V6(crate::server::INBOUND_SOURCE_V6),
                prefix: 128,
            },
        }
    }

    /// The binaries' stem: `iptables` or `ip6tables`.
    pub fn stem(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Why a port, port range or CIDR flag was rejected. The message is shown by clap next to
/// the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a number from 1 to 65535.
    #[error("{0:?} is not a port (1-65535)")]
    Port(String),
    /// A range whose start is after its end.
    #[error("{0:?}: the range's start is after its end")]
    ReversedRange(String),
    /// Not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    Address(String),
    /// A prefix length that is not a number or too long for the address.
    #[error("{0:?}: the prefix length must be 0-32 for IPv4 and 0-128 for IPv6")]
    Prefix(String),
}

/// A port or an inclusive range of ports, written `8080` or `9000-9010`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    first: NonZeroU16,
    last: NonZeroU16,
}

impl PortRange {
    /// The range as `iptables --dport` wants it: `8080` or `9000:9010`.
    pub fn to_dport(self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }

    /// Whether `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        (self.first.get()..=self.last.get()).contains(&port)
    }

    /// Every port in the range, in order.
    pub fn ports(self) -> std::ops::RangeInclusive<u16> {
        self.first.get()..=self.last.get()
    }
}

fn parse_port(s: &str) -> Result<NonZeroU16, ParseError> {
    s.trim()
        .parse::<NonZeroU16>()
        .map_err(|_| ParseError::Port(s.trim().to_owned()))
}

impl FromStr for PortRange {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse_port(a)?, parse_port(b)?),
            None => {
                let p = parse_port(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(ParseError::ReversedRange(s.trim().to_owned()));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A comma-separated list of ports and ranges (`15021,8080,9000-9010`); empty means none.
/// Exact duplicates are dropped; order is kept, so the generated rules are stable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortRange>);

impl FromStr for PortList {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out: Vec<PortRange> = Vec::new();
        for item in s.split(',').filter(|i| !i.trim().is_empty()) {
            let range = item.parse()?;
            if !out.contains(&range) {
                out.push(range);
            }
        }
        Ok(PortList(out))
    }
}

/// An IPv4 or IPv6 network, `10.0.0.0/8` or `fd00::/8`; a bare address is a single host.
/// Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`), as `iptables` itself would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The family whose rules this network belongs in.
    pub fn family(self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| ParseError::Address(s.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(ParseError::Prefix(s.to_owned())),
            },
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of networks, IPv4 and IPv6 mixed; empty means none. Exact
/// duplicates are dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out: Vec<Cidr> = Vec::new();
        for item in s.split(',').filter(|i| !i.trim().is_empty()) {
            let cidr = item.parse()?;
            if !out.contains(&cidr) {
                out.push(cidr);
            }
        }
        Ok(CidrList(out))
    }
}

/// A jump from a built-in chain into one of Weft's, the only rules outside Weft's own
/// chains. Added only when absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jump {
    /// `PREROUTING` → `WEFT_INBOUND`.
    Inbound,
    /// `OUTPUT` → `WEFT_OUTBOUND`.
    Outbound,
}

impl Jump {
    /// Both jumps, in the order they are added.
    pub const ALL: [Jump; 2] = [Jump::Inbound, Jump::Outbound];

    /// The rule as `iptables-save` prints it, which is also valid restore input.
    pub fn rule(self) -> &'static str {
        match self {
            Jump::Inbound => "-A PREROUTING -p tcp -j WEFT_INBOUND",
            Jump::Outbound => "-A OUTPUT -p tcp -j WEFT_OUTBOUND",
        }
    }
}

/// The jumps that `iptables-save -t nat` output (`save`) does not contain yet.
pub fn missing_jumps(save: &str) -> Vec<Jump> {
    Jump::ALL
        .into_iter()
        .filter(|j| !save.lines().any(|l| l.trim() == j.rule()))
        .collect()
}

/// Whether `iptables-save -t nat` output (`save`) shows Weft's chains, from an earlier run.
pub fn has_weft_chains(save: &str) -> bool {
    save.lines()
        .any(|l| l.trim_end() == format!(":{INBOUND_CHAIN} - [0:0]"))
}

/// Everything that decides the rules: the validated flags of `weft-proxy init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Where inbound TCP goes (the proxy's inbound listener).
    pub inbound_port: NonZeroU16,
    /// Where outbound TCP goes (the proxy's outbound listener).
    pub outbound_port: NonZeroU16,
    /// The proxy's UID: its own connections are never sent back to it.
    pub proxy_uid: u32,
    /// Inbound destination ports that reach the app directly (the admin port among them).
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports that bypass the proxy.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destination networks that bypass the proxy; each goes to its family only.
    pub skip_outbound_cidrs: Vec<Cidr>,
}

/// Flags that parse one by one but make no sense together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    /// Inbound and outbound must be different listeners.
    #[error("--inbound-port and --outbound-port are both {0}; they must differ")]
    SamePorts(u16),
}

impl Redirect {
    /// Checks what the flags cannot check one at a time.
    pub fn validate(&self) -> Result<(), RedirectError> {
        if self.inbound_port == self.outbound_port {
            return Err(RedirectError::SamePorts(self.inbound_port.get()));
        }
        Ok(())
    }

    /// A skipped inbound range that contains the inbound port itself: harmless (a peer
    /// dialling that port reaches the listener unredirected, and the proxy closes such a
    /// connection), but probably a typo, so it is worth a warning rather than a pod stuck
    /// in its init container over an annotation the webhook accepted.
    pub fn skipped_inbound_port(&self) -> Option<PortRange> {
        self.skip_inbound_ports
            .iter()
            .copied()
            .find(|r| r.contains(self.inbound_port.get()))
    }

    /// The rules of Weft's four chains for `family`, each as restore input (`-A ...`),
    /// in order. The redirect chains come first so that the chains jumping to them read
    /// after them.
    pub fn chain_rules(&self, family: Family) -> Vec<String> {
        let uid = self.proxy_uid;
        let lo = family.loopback();
        let mut r = vec![
            format!(
                "-A {INBOUND_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
                self.inbound_port
            ),
            format!(
                "-A {OUTBOUND_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
                self.outbound_port
            ),
        ];
        for p in &self.skip_inbound_ports {
            r.push(format!(
                "-A {INBOUND_CHAIN} -p tcp --dport {} -j RETURN",
                p.to_dport()
            ));
        }
        r.push(format!(
            "-A {INBOUND_CHAIN} -p tcp -j {INBOUND_REDIRECT_CHAIN}"
        ));
        // The inbound side handing a connection to the app: it dials the pod's own
        // address from a loopback source that nothing else uses, and must reach the app,
        // not come back to the inbound listener through the next rule.
        let src = family.inbound_source();
        r.push(format!(
            "-A {OUTBOUND_CHAIN} -s {src} -o lo -p tcp -m owner --uid-owner {uid} -j RETURN"
        ));
        // The proxy dialling its own pod's address (an endpoint of a service it balances)
        // leaves through lo: send it through the inbound side, like any other peer's
        // connection, instead of straight to the app.
        r.push(format!(
            "-A {OUTBOUND_CHAIN} -o lo ! -d {lo} -p tcp -m owner --uid-owner {uid} -j {INBOUND_CHAIN}"
        ));
        r.push(format!(
            "-A {OUTBOUND_CHAIN} -p tcp -m owner --uid-owner {uid} -j RETURN"
        ));
        r.push(format!("-A {OUTBOUND_CHAIN} -p tcp -d {lo} -j RETURN"));
        for p in &self.skip_outbound_ports {
            r.push(format!(
                "-A {OUTBOUND_CHAIN} -p tcp --dport {} -j RETURN",
                p.to_dport()
            ));
        }
        for c in self
            .skip_outbound_cidrs
            .iter()
            .filter(|c| c.family() == family)
        {
            r.push(format!("-A {OUTBOUND_CHAIN} -p tcp -d {c} -j RETURN"));
        }
        r.push(format!(
            "-A {OUTBOUND_CHAIN} -p tcp -j {OUTBOUND_REDIRECT_CHAIN}"
        ));
        r
    }

    /// The complete `iptables-restore --noflush` input for `family`: Weft's chains
    /// declared (which flushes them), refilled, and the given jumps added.
    pub fn restore_input(&self, family: Family, jumps: &[Jump]) -> String {
        let mut out = String::from("*nat\n");
        for chain in [
            INBOUND_CHAIN,
            INBOUND_REDIRECT_CHAIN,
            OUTBOUND_CHAIN,
            OUTBOUND_REDIRECT_CHAIN,
        ] {
            out.push(':');
            out.push_str(chain);
            out.push_str(" - [0:0]\n");
        }
        for rule in self.chain_rules(family) {
            out.push_str(&rule);
            out.push('\n');
        }
        for jump in jumps {
            out.push_str(jump.rule());
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        out
    }

    /// What `--dry-run` prints: for each family, a comment naming it and the restore input
    /// a first run in an empty network namespace would apply (both jumps included).
    pub fn dry_run(&self) -> String {
        let mut out = String::new();
        for family in Family::ALL {
            out.push_str(&format!(
                "# {family}: {}-restore --noflush (jumps are added only when absent)\n",
                family.stem()
            ));
            out.push_str(&self.restore_input(family, &Jump::ALL));
        }
        out.push_str(&format!(
            "# IPv6 also: ip -6 addr replace {} dev lo\n",
            Family::V6.inbound_source()
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn redirect() -> Redirect {
        Redirect {
            inbound_port: NonZeroU16::new(15006).unwrap(),
            outbound_port: NonZeroU16::new(15001).unwrap(),
            proxy_uid: 5150,
            skip_inbound_ports: "15021,8080,9000-9010".parse::<PortList>().unwrap().0,
            skip_outbound_ports: "25,3306".parse::<PortList>().unwrap().0,
            skip_outbound_cidrs: "169.254.169.254/32,fd00:ec2::254/128,10.0.0.0/8"
                .parse::<CidrList>()
                .unwrap()
                .0,
        }
    }

    #[test]
    fn ports_and_ranges_parse() {
        let l: PortList = " 15021, 8080,9000-9010,,8080".parse().unwrap();
        let shown: Vec<String> = l.0.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, ["15021", "8080", "9000-9010"]);
        let dports: Vec<String> = l.0.iter().map(|p| p.to_dport()).collect();
        assert_eq!(dports, ["15021", "8080", "9000:9010"]);
        assert_eq!("".parse::<PortList>().unwrap(), PortList::default());
        assert!("9000-9010".parse::<PortRange>().unwrap().contains(9005));
        assert!(!"9000-9010".parse::<PortRange>().unwrap().contains(9011));
    }

    #[test]
    fn bad_ports_are_rejected_with_the_culprit() {
        for (input, want) in [
            ("0", ParseError::Port("0".into())),
            ("65536", ParseError::Port("65536".into())),
            ("http", ParseError::Port("http".into())),
            ("80,x", ParseError::Port("x".into())),
            ("10-", ParseError::Port("".into())),
            ("9010-9000", ParseError::ReversedRange("9010-9000".into())),
        ] {
            assert_eq!(input.parse::<PortList>().unwrap_err(), want, "{input}");
        }
    }

    #[test]
    fn cidrs_parse_and_normalise() {
        let l: CidrList = "169.254.169.254/32, 10.1.2.3/8,fd00::1/8,::1,0.0.0.0/0"
            .parse()
            .unwrap();
        let shown: Vec<String> = l.0.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            shown,
            [
                "169.254.169.254/32",
                "10.0.0.0/8",
                "fd00::/8",
                "::1/128",
                "0.0.0.0/0"
            ]
        );
        assert_eq!(l.0[2].family(), Family::V6);
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv4_rules() {
        let want = "\
*nat
:WEFT_INBOUND - [0:0]
:WEFT_INBOUND_REDIRECT - [0:0]
:WEFT_OUTBOUND - [0:0]
:WEFT_OUTBOUND_REDIRECT - [0:0]
-A WEFT_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A WEFT_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A WEFT_INBOUND -p tcp --dport 15021 -j RETURN
-A WEFT_INBOUND -p tcp --dport 8080 -j RETURN
-A WEFT_INBOUND -p tcp --dport 9000:9010 -j RETURN
-A WEFT_INBOUND -p tcp -j WEFT_INBOUND_REDIRECT
-A WEFT_OUTBOUND -s 127.0.0.6/32 -o lo -p tcp -m owner --uid-owner 5150 -j RETURN
-A WEFT_OUTBOUND -o lo ! -d 127.0.0.0/8 -p tcp -m owner --uid-owner 5150 -j WEFT_INBOUND
-A WEFT_OUTBOUND -p tcp -m owner --uid-owner 5150 -j RETURN
-A WEFT_OUTBOUND -p tcp -d 127.0.0.0/8 -j RETURN
-A WEFT_OUTBOUND -p tcp --dport 25 -j RETURN
-A WEFT_OUTBOUND -p tcp --dport 3306 -j RETURN
-A WEFT_OUTBOUND -p tcp -d 169.254.169.254/32 -j RETURN
-A WEFT_OUTBOUND -p tcp -d 10.0.0.0/8 -j RETURN
-A WEFT_OUTBOUND -p tcp -j WEFT_OUTBOUND_REDIRECT
-A PREROUTING -p tcp -j WEFT_INBOUND
-A OUTPUT -p tcp -j WEFT_OUTBOUND
COMMIT
";
        assert_eq!(redirect().restore_input(Family::V4, &Jump::ALL), want);
    }

    #[test]
    fn ipv6_rules_get_only_ipv6_cidrs_and_their_own_loopback() {
        let v6 = redirect().restore_input(Family::V6, &[]);
        assert!(v6.contains("-A WEFT_OUTBOUND -p tcp -d fd00:ec2::254/128 -j RETURN\n"));
        assert!(v6.contains("-A WEFT_OUTBOUND -p tcp -d ::1/128 -j RETURN\n"));
        assert!(v6.contains("-o lo ! -d ::1/128 -p tcp -m owner --uid-owner 5150"));
        assert!(v6.contains(
            "-A WEFT_OUTBOUND -s ::6/128 -o lo -p tcp -m owner --uid-owner 5150 -j RETURN\n"
        ));
        assert!(!v6.contains("169.254"), "{v6}");
        assert!(!v6.contains("10.0.0.0"), "{v6}");
        assert!(!v6.contains("-A PREROUTING"), "no jumps asked for: {v6}");
        let v4 = redirect().restore_input(Family::V4, &[]);
        assert!(!v4.contains("fd00"), "{v4}");
    }

    #[test]
    fn only_absent_jumps_are_added() {
        let empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(missing_jumps(empty), Jump::ALL);
        let both = "*nat\n-A PREROUTING -p tcp -j WEFT_INBOUND\n\
                    -A OUTPUT -p tcp -j WEFT_OUTBOUND\nCOMMIT\n";
        assert_eq!(missing_jumps(both), []);
        let one = "*nat\n-A OUTPUT -p tcp -j WEFT_OUTBOUND\n\
                   -A OUTPUT -p tcp -j WEFT_OUTBOUND_REDIRECT\nCOMMIT\n";
        assert_eq!(missing_jumps(one), [Jump::Inbound]);
    }

    #[test]
    fn weft_chains_are_recognised() {
        let empty = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert!(!has_weft_chains(empty));
        let ours = "*nat\n:PREROUTING ACCEPT [0:0]\n:WEFT_INBOUND - [0:0]\nCOMMIT\n";
        assert!(has_weft_chains(ours));
    }

    #[test]
    fn dry_run_covers_both_families() {
        let out = redirect().dry_run();
        assert_eq!(out.matches("*nat\n").count(), 2);
        assert_eq!(out.matches("COMMIT\n").count(), 2);
        assert!(out.starts_with("# IPv4: iptables-restore"));
        assert!(out.contains("# IPv6: ip6tables-restore"));
    }

    #[test]
    fn contradictory_flags_are_rejected() {
        let mut r = redirect();
        r.outbound_port = r.inbound_port;
        assert_eq!(r.validate(), Err(RedirectError::SamePorts(15006)));
        assert_eq!(redirect().validate(), Ok(()));
        assert_eq!(redirect().skipped_inbound_port(), None);
        let mut r = redirect();
        r.skip_inbound_ports.push("15000-15010".parse().unwrap());
        assert_eq!(r.validate(), Ok(()), "only worth a warning");
        assert_eq!(
            r.skipped_inbound_port(),
            Some("15000-15010".parse().unwrap())
        );
    }
}
