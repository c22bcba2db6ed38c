//! `weft-proxy init`: the pod's init container. It installs the iptables rules that send
//! the pod's TCP through the sidecar, then exits; it runs as root with `NET_ADMIN` and
//! `NET_RAW` only, before the proxy and the app start.
//!
//! ```text
//!  flags ─▶ InitArgs ─▶ rules::Redirect (validated) ─┬─ --dry-run ─▶ stdout (restore input)
//!                                                    └─ backend probe (nft, then legacy)
//!                                                         └─ per family: *-save -t nat
//!                                                              ─▶ rules::missing_jumps
//!                                                              ─▶ *-restore --noflush
//!                                                         └─ IPv6: ::6/128 on lo
//! ```
//!
//! [`rules`] decides what to install (pure, unit-tested); [`iptables`] runs the binaries.
//! Re-running changes nothing: Weft's own chains are flushed and refilled in one atomic
//! restore, and the jumps into them are added only when absent. See `docs/interception.md`.

pub mod iptables;
pub mod rules;

use std::{io::Write as _, num::NonZeroU16};

use clap::ValueEnum;

use self::{
    iptables::{Backend, CommandError},
    rules::{CidrList, Family, PortList, Redirect, RedirectError},
};

/// The flags of `weft-proxy init`. The injector writes them; keep their names stable.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// The proxy's inbound listener port: inbound TCP is redirected here.
    #[arg(long, env = "WEFT_INIT_INBOUND_PORT", default_value = "15006")]
    pub inbound_port: NonZeroU16,
    /// The proxy's outbound listener port: outbound TCP is redirected here.
    #[arg(long, env = "WEFT_INIT_OUTBOUND_PORT", default_value = "15001")]
    pub outbound_port: NonZeroU16,
    /// The UID the proxy runs as: its own connections are not redirected (no loop).
    #[arg(long, env = "WEFT_INIT_PROXY_UID", default_value = "5150")]
    pub proxy_uid: u32,
    /// Inbound ports that reach the app directly, such as `15021,8080,9000-9010`. The
    /// injector always includes the admin port.
    #[arg(long, env = "WEFT_INIT_SKIP_INBOUND_PORTS", default_value = "")]
    pub skip_inbound_ports: PortList,
    /// Outbound destination ports that bypass the proxy, such as `25,3306`.
    #[arg(long, env = "WEFT_INIT_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: PortList,
    /// Outbound destination networks that bypass the proxy, IPv4 or IPv6, such as
    /// `169.254.169.254/32,10.0.0.0/8`.
    #[arg(long, env = "WEFT_INIT_SKIP_OUTBOUND_CIDRS", default_value = "")]
    pub skip_outbound_cidrs: CidrList,
    /// Which iptables implementation writes the rules: `auto` tries nft, then legacy.
    #[arg(long, env = "WEFT_INIT_BACKEND", value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Print the rules (iptables-restore input) instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,
}

/// The `--backend` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// nft if it works here, else legacy.
    Auto,
    /// `iptables-nft` only.
    Nft,
    /// `iptables-legacy` only.
    Legacy,
}

/// Why `weft-proxy init` failed. Each message stands on its own in the init container's
/// log.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The kernel refused: the container lacks `CAP_NET_ADMIN` (or is not root).
    #[error(
        "weft-proxy init: permission denied changing iptables; the init container needs \
         NET_ADMIN and NET_RAW"
    )]
    PermissionDenied(#[source] CommandError),
    /// Flags that are each valid but contradict each other.
    #[error("weft-proxy init: invalid flags")]
    Flags(#[source] RedirectError),
    /// `--log` does not parse.
    #[error("weft-proxy init: --log {0:?}: {1}")]
    LogFilter(String, #[source] weft_api::LogFilterError),
    /// Neither backend works here; each attempt's error is listed.
    #[error("weft-proxy init: no working iptables backend (tried {tried})")]
    NoBackend {
        /// `backend: error` for each backend tried.
        tried: String,
    },
    /// Reading or applying the rules failed for a reason other than permission.
    #[error("weft-proxy init: {backend} {family} rules could not be installed")]
    Install {
        /// The backend in use.
        backend: Backend,
        /// The family being installed.
        family: Family,
        /// The failing command.
        #[source]
        source: CommandError,
    },
    /// The inbound side's IPv6 source address could not be added to `lo`.
    #[error(
        "weft-proxy init: could not add the proxy's inbound source address to lo; the \
         init container needs `ip` (iproute2) when IPv6 is enabled"
    )]
    LoopbackAddress(#[source] CommandError),
    /// `--dry-run` could not write to standard output.
    #[error("weft-proxy init: write the rules to standard output")]
    Stdout(#[source] std::io::Error),
}

impl InitError {
    fn from_command(backend: Backend, family: Family, e: CommandError) -> Self {
        if e.is_permission_denied() {
            InitError::PermissionDenied(e)
        } else {
            InitError::Install {
                backend,
                family,
                source: e,
            }
        }
    }
}

impl InitArgs {
    /// The validated rule inputs.
    pub fn redirect(&self) -> Result<Redirect, InitError> {
        let redirect = Redirect {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid,
            skip_inbound_ports: self.skip_inbound_ports.0.clone(),
            skip_outbound_ports: self.skip_outbound_ports.0.clone(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.0.clone(),
        };
        redirect.validate().map_err(InitError::Flags)?;
        if let Some(range) = redirect.skipped_inbound_port() {
            tracing::warn!(
                %range,
                inbound_port = %self.inbound_port,
                "--skip-inbound-ports contains the inbound port"
            );
        }
        Ok(redirect)
    }
}

/// The subcommand's entry point: sets up logging to stderr, then [`run`].
pub fn main(args: InitArgs) -> Result<(), InitError> {
    let filter = weft_api::LogFilter::parse(&args.log)
        .map_err(|e| InitError::LogFilter(args.log.clone(), e))?;
    // Ignore the error: a subscriber already installed (by an embedding test) is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter.env_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    run(&args)
}

/// Validates the flags, then prints (`--dry-run`) or installs the rules.
pub fn run(args: &InitArgs) -> Result<(), InitError> {
    let redirect = args.redirect()?;
    if args.dry_run {
        let mut out = std::io::stdout().lock();
        out.write_all(redirect.dry_run().as_bytes())
            .and_then(|()| out.flush())
            .map_err(InitError::Stdout)?;
        return Ok(());
    }
    let backend = choose_backend(args.backend)?;
    for family in Family::ALL {
        if family == Family::V6 && !ipv6_enabled() {
            tracing::warn!(
                %backend,
                "IPv6 is disabled in this kernel; installing IPv4 rules only"
            );
            continue;
        }
        install(&redirect, backend, family)?;
        if family == Family::V6 && !ipv6_on_loopback() {
            // The rules stand (IPv6 traffic is still caught, not let past the proxy), but
            // `lo` takes no IPv6 address; the kernel refuses it as if for permission.
            tracing::warn!(
                "IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6=1); ::6 not added, \
                 so the inbound side cannot hand IPv6 connections to the application"
            );
        } else if family == Family::V6 {
            let source = crate::server::INBOUND_SOURCE_V6;
            iptables::add_loopback_v6(source).map_err(|e| {
                if e.is_permission_denied() {
                    InitError::PermissionDenied(e)
                } else {
                    InitError::LoopbackAddress(e)
                }
            })?;
            tracing::info!(%source, "inbound source address added to lo");
        }
    }
    Ok(())
}

/// Whether this network namespace has a legacy (x_tables) IPv4 nat table.
fn legacy_nat_exists() -> bool {
    std::fs::read_to_string("/proc/net/ip_tables_names")
        .is_ok_and(|names| names.lines().any(|t| t.trim() == "nat"))
}

/// Whether the kernel has IPv6 (the `ipv6.disable=1` boot flag removes this file).
fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Whether `lo` takes IPv6 addresses in this network namespace: some runtimes and CNI
/// plugins turn IPv6 off with `net.ipv6.conf.all.disable_ipv6=1` rather than at boot.
fn ipv6_on_loopback() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .map_or(true, |v| v.trim() != "1")
}

/// The backend to use: the one asked for, or with `auto` the one whose IPv4 nat table
/// already holds Weft's chains (an earlier run's choice, so a re-run never installs a
/// second copy through the other backend), else the first whose nat table can be read.
/// A permission error ends the probe at once: trying the other backend would fail the
/// same way and hide the real cause.
fn choose_backend(choice: BackendChoice) -> Result<Backend, InitError> {
    let candidates: &[Backend] = match choice {
        BackendChoice::Auto => &Backend::PREFERENCE,
        BackendChoice::Nft => &[Backend::Nft],
        BackendChoice::Legacy => &[Backend::Legacy],
    };
    let mut usable = None;
    let mut tried = Vec::new();
    for &backend in candidates {
        // Reading a legacy table creates it: once nft works, look at legacy only if this
        // namespace already has a legacy nat table (that could hold Weft's chains), so a
        // pod does not gain an empty one (and `iptables-nft` its "legacy tables present"
        // warning) just from probing.
        if backend == Backend::Legacy && usable.is_some() && !legacy_nat_exists() {
            continue;
        }
        match iptables::save_nat(backend, Family::V4) {
            Ok(save) if rules::has_weft_chains(&save) => {
                tracing::debug!(%backend, "iptables backend chosen: it holds Weft's chains");
                return Ok(backend);
            }
            Ok(_) => {
                usable.get_or_insert(backend);
            }
            Err(e) if e.is_permission_denied() => return Err(InitError::PermissionDenied(e)),
            Err(error) => {
                tracing::debug!(%backend, %error, "iptables backend unusable");
                tried.push(format!("{backend}: {error}"));
            }
        }
    }
    match usable {
        Some(backend) => {
            tracing::debug!(%backend, "iptables backend chosen");
            Ok(backend)
        }
        None => Err(InitError::NoBackend {
            tried: tried.join("; "),
        }),
    }
}

/// Installs one family's rules: reads the nat table to find which jumps exist, then
/// applies Weft's chains and the missing jumps in one restore.
fn install(redirect: &Redirect, backend: Backend, family: Family) -> Result<(), InitError> {
    let save = iptables::save_nat(backend, family)
        .map_err(|e| InitError::from_command(backend, family, e))?;
    let jumps = rules::missing_jumps(&save);
    let input = redirect.restore_input(family, &jumps);
    iptables::restore(backend, family, &input)
        .map_err(|e| InitError::from_command(backend, family, e))?;
    tracing::info!(
        %backend,
        %family,
        rules = redirect.chain_rules(family).len(),
        jumps_added = jumps.len(),
        "redirect rules installed"
    );
    Ok(())
}
