//! Running the `iptables` binaries: probing for a backend, reading the nat table with
//! `*-save`, and applying restore input with `*-restore --noflush`. Every call is a
//! subprocess with a bounded lock wait (`-w`), so nothing here needs unsafe code or can
//! block forever on another writer.
//!
//! ```text
//!  Backend::Nft    ─▶ iptables-nft-save / iptables-nft-restore   (ip6tables-nft-*)
//!  Backend::Legacy ─▶ iptables-legacy-save / iptables-legacy-restore (ip6tables-legacy-*)
//!                     or, when only those exist and report the backend in `--version`,
//!                     plain iptables-save / iptables-restore
//!  IPv6 only:        ip -6 addr replace ::6/128 dev lo (the inbound side's source)
//! ```

use std::{
    fmt, io,
    io::Write as _,
    process::{Command, Stdio},
};

use super::rules::Family;

/// How long `iptables` waits for the xtables lock held by another writer, in seconds.
const LOCK_WAIT_SECS: &str = "10";

/// Which implementation of `iptables` writes the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`: the iptables syntax over the kernel's nf_tables.
    Nft,
    /// `iptables-legacy`: the old x_tables interface, for kernels without nf_tables.
    Legacy,
}

impl Backend {
    /// Probed in this order by `--backend auto`.
    pub const PREFERENCE: [Backend; 2] = [Backend::Nft, Backend::Legacy];

    fn suffix(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// The save binary of `family`, such as `iptables-nft-save`.
    pub fn save_program(self, family: Family) -> String {
        self.programs(family).save
    }

    /// The restore binary of `family`, such as `ip6tables-legacy-restore`.
    pub fn restore_program(self, family: Family) -> String {
        self.programs(family).restore
    }

    /// This backend's programs for `family` on this machine: the backend-suffixed names
    /// (`iptables-nft-save`) when they are installed; else the plain names
    /// (`iptables-save`) when they say they are this backend (an image that ships a single
    /// iptables); else the suffixed names, whose absence then shows in the error.
    fn programs(self, family: Family) -> Programs {
        let suffixed = Programs {
            save: format!("{}-{}-save", family.stem(), self.suffix()),
            restore: format!("{}-{}-restore", family.stem(), self.suffix()),
        };
        if on_path(&suffixed.save) && on_path(&suffixed.restore) {
            return suffixed;
        }
        let plain = Programs {
            save: format!("{}-save", family.stem()),
            restore: format!("{}-restore", family.stem()),
        };
        match run(&plain.save, &["--version"], None) {
            Ok(version) if on_path(&plain.restore) && self.is_version_of(&version) => plain,
            _ => suffixed,
        }
    }

    /// Whether `iptables-save --version` output (`iptables-save v1.8.9 (nf_tables)`)
    /// names this backend. Versions before 1.8 name none and are all legacy.
    fn is_version_of(self, version: &str) -> bool {
        let nft = version.contains("nf_tables");
        match self {
            Backend::Nft => nft,
            Backend::Legacy => !nft,
        }
    }
}

/// A save and a restore program of one backend and family.
struct Programs {
    save: String,
    restore: String,
}

/// Whether `program` is a file in a directory of `PATH`, as `Command` would find it.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

/// A command that could not be run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The binary is not installed (not on `PATH`).
    #[error("`{command}` is not installed")]
    NotFound {
        /// The command line.
        command: String,
    },
    /// The binary could not be started or fed for another reason.
    #[error("`{command}` could not be run")]
    Io {
        /// The command line.
        command: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
}

impl CommandError {
    /// Whether the failure is the kernel refusing the change for lack of privilege
    /// (`CAP_NET_ADMIN`) rather than a bad rule or a missing binary.
    pub fn is_permission_denied(&self) -> bool {
        match self {
            CommandError::NotFound { .. } => false,
            CommandError::Io { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
            CommandError::Failed { stderr, .. } => {
                stderr.contains("Permission denied") || stderr.contains("Operation not permitted")
            }
        }
    }
}

/// Runs `program args...`, feeding `stdin` if given, and returns its standard output.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CommandError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => CommandError::NotFound {
                command: command.clone(),
            },
            _ => CommandError::Io {
                command: command.clone(),
                source,
            },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Restore input is a few kilobytes at most, well under a pipe's buffer; the pipe is
        // closed at the end of this block so the child sees end of input.
        pipe.write_all(input.as_bytes())
            .map_err(|source| CommandError::Io {
                command: command.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| CommandError::Io {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(CommandError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nat table of `family` as `iptables-save -t nat` prints it. Needs `CAP_NET_ADMIN`,
/// so it doubles as the permission and backend probe.
pub fn save_nat(backend: Backend, family: Family) -> Result<String, CommandError> {
    run(&backend.save_program(family), &["-t", "nat"], None)
}

/// Applies `input` with `iptables-restore --noflush`: atomically per table, touching only
/// the chains that `input` declares or appends to.
pub fn restore(backend: Backend, family: Family, input: &str) -> Result<(), CommandError> {
    run(
        &backend.restore_program(family),
        &["--noflush", "-w", LOCK_WAIT_SECS],
        Some(input),
    )
    .map(drop)
}

/// Adds `addr/128` to the loopback interface (`ip -6 addr replace`, so a re-run changes
/// nothing): the IPv6 source address of the proxy's inbound side. IPv4 needs no such step,
/// since all of 127.0.0.0/8 is local already; IPv6 has only `::1`, and a connection from
/// `::1` to the pod's own address never hears a refusal (the kernel routes the reset to a
/// loopback address strictly through the interface the SYN came in on).
pub fn add_loopback_v6(addr: std::net::Ipv6Addr) -> Result<(), CommandError> {
    let cidr = format!("{addr}/128");
    run("ip", &["-6", "addr", "replace", &cidr, "dev", "lo"], None).map(drop)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn versions_name_their_backend() {
        let nft = "iptables-save v1.8.9 (nf_tables)";
        let legacy = "iptables-save v1.8.9 (legacy)";
        let old = "iptables-save v1.6.1";
        assert!(Backend::Nft.is_version_of(nft));
        assert!(!Backend::Nft.is_version_of(legacy));
        assert!(!Backend::Nft.is_version_of(old));
        assert!(Backend::Legacy.is_version_of(legacy));
        assert!(Backend::Legacy.is_version_of(old));
        assert!(!Backend::Legacy.is_version_of(nft));
    }

    #[test]
    fn a_missing_binary_is_not_found() {
        let err = run("weft-no-such-binary-anywhere", &[], None).unwrap_err();
        assert!(matches!(err, CommandError::NotFound { .. }), "{err}");
        assert!(!err.is_permission_denied());
    }

    #[test]
    fn failures_carry_stderr_and_permission_is_recognised() {
        let err = run(
            "sh",
            &[
                "-c",
                "echo 'x: Permission denied (you must be root)' >&2; exit 4",
            ],
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("you must be root"), "{err}");
        assert!(err.is_permission_denied());
        let err = run("sh", &["-c", "echo 'Bad rule' >&2; exit 1"], None).unwrap_err();
        assert!(!err.is_permission_denied());
    }

    #[test]
    fn stdin_is_fed_and_stdout_returned() {
        let out = run("cat", &[], Some("*nat\nCOMMIT\n")).unwrap();
        assert_eq!(out, "*nat\nCOMMIT\n");
    }
}
