//! What the node changes on this machine, and how every change is undone: the pod
//! bridge and routes, the egress guard, the cgroup root, mounts, and processes that
//! outlive their parents (containerd's shims and the containers under them).
//!
//! Every step here is idempotent, so [`sweep`] can run before `up` (to clean what a
//! crashed or killed run left) as well as at `down`.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{BRIDGE, CGROUP_ROOT, GUARDED_RANGE, HOST_IP, POD_PREFIX_LEN, SERVICE_CIDR};

/// The iptables chain (table `mangle`) that drops packets to [`GUARDED_RANGE`] leaving
/// through an external interface.
pub const GUARD_CHAIN: &str = "WEFT-NODE-GUARD";

/// Runs a command, failing with its stderr when it exits non-zero.
pub(crate) fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command whose failure means "already so" (deleting what is not there).
fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// Interfaces through which a packet would leave this machine: those carrying a default
/// route and every interface backed by a device. The node's bridge, loopback and
/// virtual pairs are not external.
pub fn external_interfaces() -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for family in ["-4", "-6"] {
        let routes = sh("ip", &[family, "-o", "route", "show", "default"])?;
        for line in routes.lines() {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "dev"
                    && let Some(dev) = words.next()
                {
                    found.push(dev.to_owned());
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for entry in entries.flatten() {
            if entry.path().join("device").exists() {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found.retain(|d| d != "lo" && d != BRIDGE);
    found.sort();
    found.dedup();
    Ok(found)
}

/// The guard's rules: drop anything addressed to [`GUARDED_RANGE`] leaving through one of
/// `external` interfaces. In `mangle POSTROUTING`, which every packet leaving through an
/// interface crosses after its destination was translated (kube-proxy's DNAT) and its
/// route chosen, and which kube-proxy does not reorder.
fn guard_commands(external: &[String]) -> Vec<Vec<String>> {
    let mut cmds = vec![
        vec!["-t", "mangle", "-N", GUARD_CHAIN],
        vec!["-t", "mangle", "-F", GUARD_CHAIN],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>())
    .collect::<Vec<_>>();
    for dev in external {
        cmds.push(
            [
                "-t",
                "mangle",
                "-A",
                GUARD_CHAIN,
                "-d",
                GUARDED_RANGE,
                "-o",
                dev,
                "-m",
                "comment",
                "--comment",
                "weft test bed: pod and service ranges never leave this machine",
                "-j",
                "DROP",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        );
    }
    cmds
}

/// Installs the egress guard in the network namespace `netns` (this machine's when
/// `None`), for packets leaving through `external`, and returns the interfaces guarded.
pub fn install_guard(netns: Option<&str>, external: &[String]) -> anyhow::Result<()> {
    if external.is_empty() {
        bail!("found no external interface to guard; refusing to start pods without the guard");
    }
    let run = |args: &[String]| -> anyhow::Result<String> {
        let mut full: Vec<&str> = Vec::new();
        let program = match netns {
            Some(ns) => {
                full.extend(["netns", "exec", ns, "iptables", "-w"]);
                "ip"
            }
            None => {
                full.push("-w");
                "iptables"
            }
        };
        full.extend(args.iter().map(String::as_str));
        sh(program, &full)
    };
    let cmds = guard_commands(external);
    // `-N` fails when the chain exists: that is the state wanted.
    let _ = run(&cmds[0]);
    for cmd in &cmds[1..] {
        run(cmd)?;
    }
    let jump: Vec<String> = ["-t", "mangle", "-C", "POSTROUTING", "-j", GUARD_CHAIN]
        .into_iter()
        .map(str::to_owned)
        .collect();
    if run(&jump).is_err() {
        let insert: Vec<String> = ["-t", "mangle", "-I", "POSTROUTING", "1", "-j", GUARD_CHAIN]
            .into_iter()
            .map(str::to_owned)
            .collect();
        run(&insert)?;
    }
    Ok(())
}

/// Removes the egress guard from this machine.
pub fn remove_guard() {
    while Command::new("iptables")
        .args(["-w", "-t", "mangle", "-D", "POSTROUTING", "-j", GUARD_CHAIN])
        .output()
        .is_ok_and(|o| o.status.success())
    {}
    sh_quiet("iptables", &["-w", "-t", "mangle", "-F", GUARD_CHAIN]);
    sh_quiet("iptables", &["-w", "-t", "mangle", "-X", GUARD_CHAIN]);
}

/// Creates the pod bridge holding the host address (the pods' gateway, and where the API
/// server listens), routes the Service range onto it, and turns on what kube-proxy needs.
pub fn setup_bridge() -> anyhow::Result<()> {
    sh_quiet("ip", &["link", "add", BRIDGE, "type", "bridge"]);
    let addr = format!("{HOST_IP}/{POD_PREFIX_LEN}");
    let current = sh("ip", &["-o", "-4", "addr", "show", "dev", BRIDGE])?;
    if !current.contains(&addr) {
        sh("ip", &["addr", "add", &addr, "dev", BRIDGE])?;
    }
    sh("ip", &["link", "set", BRIDGE, "up"])?;
    // Host processes reach Service addresses through kube-proxy's DNAT; this route keeps
    // those packets (and any to an unused Service address) on the bridge.
    sh("ip", &["route", "replace", SERVICE_CIDR, "dev", BRIDGE])?;
    // Anything else in the guarded range has nowhere to go: a second line of defence
    // behind the iptables guard (more specific routes, such as the bridge's, still win).
    sh("ip", &["route", "replace", "blackhole", GUARDED_RANGE])?;
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/bridge/bridge-nf-call-iptables", "1"),
    ] {
        fs::write(path, value).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

/// Removes the bridge and the routes [`setup_bridge`] added.
pub fn remove_bridge() {
    sh_quiet("ip", &["route", "del", "blackhole", GUARDED_RANGE]);
    sh_quiet("ip", &["route", "del", SERVICE_CIDR, "dev", BRIDGE]);
    sh_quiet("ip", &["link", "del", BRIDGE]);
}

/// The mounted cgroup hierarchies (v1 controllers and the v2 unified one).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split_whitespace().next().unwrap_or("");
        if (fstype == "cgroup" || fstype == "cgroup2")
            && let Some(mount) = left.split_whitespace().nth(4)
        {
            dirs.push(PathBuf::from(mount));
        }
    }
    dirs
}

/// Creates the kubelet's cgroup root in every hierarchy (the kubelet refuses a root that
/// does not exist), with the cpuset controller's CPUs and memory nodes inherited.
pub fn create_cgroup_root() -> anyhow::Result<()> {
    for h in cgroup_hierarchies() {
        let dir = h.join(CGROUP_ROOT);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = h.join(file);
            if parent.exists() {
                let value = fs::read_to_string(&parent)?;
                fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}/{file}", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// Kills every process in the node's cgroups and removes them, deepest first.
pub fn remove_cgroups() -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    for h in cgroup_hierarchies() {
        let root = h.join(CGROUP_ROOT);
        if !root.exists() {
            continue;
        }
        loop {
            let mut dirs = Vec::new();
            walk_dirs(&root, &mut dirs);
            for dir in &dirs {
                if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        crate::process::kill(pid);
                    }
                }
            }
            // Deepest first: a cgroup with children cannot be removed.
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            let mut left = 0;
            for dir in &dirs {
                if fs::remove_dir(dir).is_err() && dir.exists() {
                    left += 1;
                }
            }
            if left == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{left} cgroups under {} would not go", root.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&e.path(), out);
            }
        }
    }
}

/// Unmounts everything mounted under `root` (container root filesystems, network
/// namespaces, volumes), deepest first.
pub fn unmount_under(root: &Path) -> anyhow::Result<()> {
    for _ in 0..5 {
        let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
            return Ok(());
        };
        let mut mounts: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .map(|m| PathBuf::from(m.replace("\\040", " ")))
            .filter(|m| m.starts_with(root))
            .collect();
        if mounts.is_empty() {
            return Ok(());
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        mounts.dedup();
        for m in &mounts {
            crate::process::unmount_detach(m);
        }
    }
    bail!("mounts under {} remain after five passes", root.display())
}

/// Kills containerd shims serving the containerd whose socket lives under `root`: they
/// run in their own session and outlive containerd.
pub fn kill_shims(root: &Path) {
    let needle = root.display().to_string();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
            crate::process::kill(pid);
        }
    }
}

/// Removes what CNI and containerd keep outside the node's directory: results cached by
/// libcni for the node's network, and containerd's shim socket directory once empty.
pub fn remove_cni_leftovers(network: &str) {
    let _ = fs::remove_dir("/run/containerd/s");
    let _ = fs::remove_dir("/run/containerd/runc");
    let _ = fs::remove_dir("/run/containerd");
    if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{network}-"))
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Removes every iptables and ip6tables chain whose name starts with one of `prefixes`
/// (kube-proxy's and the kubelet's `KUBE-*`, the portmap plugin's `CNI-*`), with the
/// jumps to them from the built-in chains.
pub fn remove_chains(prefixes: &[&str]) {
    let ours = |name: &str| prefixes.iter().any(|p| name.starts_with(p));
    for program in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle", "raw"] {
            let Ok(rules) = sh(program, &["-w", "-t", table, "-S"]) else {
                continue;
            };
            let mut chains = Vec::new();
            for line in rules.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["-N", chain] if ours(chain) => chains.push(chain.to_string()),
                    ["-A", chain, rest @ ..] if !ours(chain) => {
                        let jumps_to_ours = rest
                            .windows(2)
                            .any(|w| (w[0] == "-j" || w[0] == "-g") && ours(w[1]));
                        if jumps_to_ours {
                            // `iptables -S` quotes as the shell would; deleting by the
                            // same words works for the rules these tools write.
                            let args: Vec<String> = std::iter::once("-D".to_owned())
                                .chain(words[1..].iter().map(|w| w.trim_matches('"').to_owned()))
                                .collect();
                            let mut full = vec!["-w", "-t", table];
                            full.extend(args.iter().map(String::as_str));
                            sh_quiet(program, &full);
                        }
                    }
                    _ => {}
                }
            }
            for chain in &chains {
                sh_quiet(program, &["-w", "-t", table, "-F", chain]);
            }
            for chain in &chains {
                sh_quiet(program, &["-w", "-t", table, "-X", chain]);
            }
        }
    }
}
