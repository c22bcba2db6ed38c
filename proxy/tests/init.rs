//! `weft-proxy init` for real: each test makes two network namespaces of its own — a "pod"
//! and a "peer" joined by a veth pair (see [`netns`]) — runs `weft-proxy init` in the pod,
//! and sends real TCP (IPv4 and IPv6) to see where it lands. Traffic never leaves those
//! namespaces.
//!
//! ```text
//!   peer ns                                    pod ns (weft-proxy init ran here)
//!   198.18.250.1  fd00:77::1    ◀──── veth ────▶  198.18.250.2  fd00:77::2
//!   198.18.251.1  fd00:77:1::1  (a skipped CIDR)  listeners: inbound :15006, outbound :15001,
//!   listener "peer" :80 :3306                            app :8080 :9005, admin :15021
//! ```
//!
//! The listeners stand in for the proxy: each answers with its name and the original
//! destination it saw. Built with `harness = false` (see [`netns::main`]); needs root,
//! `ip`, `iptables`/`ip6tables` (nft and legacy), `setpriv` and `bash`.

// Helpers below panic on failed setup, which fails the test that called them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns;

use std::{
    io::Write,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use netns::{BIN, FAR4, FAR6, PEER4, PEER6, POD4, POD6, Pair, Test, assert_landed, sh_ok, v6};

/// The flags the injector passes, with skip lists that the tests exercise.
const INIT_FLAGS: &[&str] = &[
    "--inbound-port=15006",
    "--outbound-port=15001",
    "--proxy-uid=5150",
    "--skip-inbound-ports=15021,9000-9010",
    "--skip-outbound-ports=25,3306",
    "--skip-outbound-cidrs=169.254.169.254/32,198.18.251.0/24,fd00:77:1::/64",
];

fn main() -> ExitCode {
    netns::main(&[
        Test {
            name: "inbound_tcp_is_redirected_to_the_inbound_port_with_its_original_destination",
            netns: true,
            run: inbound_tcp_is_redirected_to_the_inbound_port_with_its_original_destination,
        },
        Test {
            name: "outbound_tcp_is_redirected_to_the_outbound_port_with_its_original_destination",
            netns: true,
            run: outbound_tcp_is_redirected_to_the_outbound_port_with_its_original_destination,
        },
        Test {
            name: "skipped_ports_and_cidrs_bypass_the_proxy",
            netns: true,
            run: skipped_ports_and_cidrs_bypass_the_proxy,
        },
        Test {
            name: "the_proxy_uid_is_not_redirected_and_loopback_stays_local",
            netns: true,
            run: the_proxy_uid_is_not_redirected_and_loopback_stays_local,
        },
        Test {
            name: "the_legacy_backend_redirects_too",
            netns: true,
            run: the_legacy_backend_redirects_too,
        },
        Test {
            name: "a_second_run_changes_nothing",
            netns: true,
            run: a_second_run_changes_nothing,
        },
        Test {
            name: "auto_prefers_nft_but_keeps_to_the_backend_an_earlier_run_used",
            netns: true,
            run: auto_prefers_nft_but_keeps_to_the_backend_an_earlier_run_used,
        },
        Test {
            name: "plain_iptables_names_serve_when_the_suffixed_ones_are_missing",
            netns: true,
            run: plain_iptables_names_serve_when_the_suffixed_ones_are_missing,
        },
        Test {
            name: "ipv6_turned_off_by_sysctl_keeps_the_rules_and_skips_the_loopback_address",
            netns: true,
            run: ipv6_turned_off_by_sysctl_keeps_the_rules_and_skips_the_loopback_address,
        },
        Test {
            name: "dry_run_prints_the_rules_and_changes_nothing",
            netns: true,
            run: dry_run_prints_the_rules_and_changes_nothing,
        },
        Test {
            name: "lacking_permission_fails_with_a_clear_message",
            netns: true,
            run: lacking_permission_fails_with_a_clear_message,
        },
        Test {
            name: "bad_flags_are_rejected_before_anything_is_touched",
            netns: false,
            run: bad_flags_are_rejected_before_anything_is_touched,
        },
    ])
}

/// Starts the listeners of the diagram and waits until they are bound.
fn listen(pair: &mut Pair) {
    let (pod, peer) = (pair.pod.clone(), pair.peer.clone());
    pair.spawn_listener(
        &pod,
        "inbound=15006;outbound=15001;app=8080,9005;admin=15021",
    );
    pair.spawn_listener(&peer, "peer=80,3306");
}

// ---- the tests ----

fn inbound_tcp_is_redirected_to_the_inbound_port_with_its_original_destination() {
    let mut pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    listen(&mut pair);
    assert_landed(
        &pair.peer_dials(POD4, 8080),
        "inbound",
        &format!("{POD4}:8080"),
    );
    assert_landed(&pair.peer_dials(POD6, 8080), "inbound", &v6(POD6, 8080));
    // A port with no listener at all is still redirected: the proxy decides.
    assert_landed(
        &pair.peer_dials(POD4, 4444),
        "inbound",
        &format!("{POD4}:4444"),
    );
}

fn outbound_tcp_is_redirected_to_the_outbound_port_with_its_original_destination() {
    let mut pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    listen(&mut pair);
    assert_landed(
        &pair.app_dials(PEER4, 80),
        "outbound",
        &format!("{PEER4}:80"),
    );
    assert_landed(&pair.app_dials(PEER6, 80), "outbound", &v6(PEER6, 80));
}

fn skipped_ports_and_cidrs_bypass_the_proxy() {
    let mut pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    listen(&mut pair);
    // Inbound: the admin port and a port inside a skipped range reach the pod directly.
    assert_landed(&pair.peer_dials(POD4, 15021), "admin", "none");
    assert_landed(&pair.peer_dials(POD6, 15021), "admin", "none");
    assert_landed(&pair.peer_dials(POD4, 9005), "app", "none");
    assert_landed(&pair.peer_dials(POD6, 9005), "app", "none");
    // Outbound: a skipped port, and addresses in the skipped IPv4 and IPv6 networks.
    assert_landed(&pair.app_dials(PEER4, 3306), "peer", "none");
    assert_landed(&pair.app_dials(PEER6, 3306), "peer", "none");
    assert_landed(&pair.app_dials(FAR4, 80), "peer", "none");
    assert_landed(&pair.app_dials(FAR6, 80), "peer", "none");
    // The skipped networks do not leak into the neighbouring addresses.
    assert_landed(
        &pair.app_dials(PEER4, 80),
        "outbound",
        &format!("{PEER4}:80"),
    );
    assert_landed(&pair.app_dials(PEER6, 80), "outbound", &v6(PEER6, 80));
}

fn the_proxy_uid_is_not_redirected_and_loopback_stays_local() {
    let mut pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    listen(&mut pair);
    // The proxy's own outbound connections go where they were sent: no loop.
    assert_landed(&pair.proxy_dials(PEER4, 80), "peer", "none");
    assert_landed(&pair.proxy_dials(PEER6, 80), "peer", "none");
    // The proxy's inbound side dials the app over loopback: straight through.
    assert_landed(&pair.proxy_dials("127.0.0.1", 8080), "app", "none");
    assert_landed(&pair.proxy_dials("::1", 8080), "app", "none");
    // The app dialling loopback stays local too.
    assert_landed(&pair.app_dials("127.0.0.1", 8080), "app", "none");
    assert_landed(&pair.app_dials("::1", 8080), "app", "none");
    // The app dialling its own pod address is outbound traffic like any other...
    assert_landed(
        &pair.app_dials(POD4, 8080),
        "outbound",
        &format!("{POD4}:8080"),
    );
    assert_landed(&pair.app_dials(POD6, 8080), "outbound", &v6(POD6, 8080));
    // ...and the proxy dialling its own pod address (an endpoint it balanced to) goes
    // through the inbound side, as a peer's connection would.
    assert_landed(
        &pair.proxy_dials(POD4, 8080),
        "inbound",
        &format!("{POD4}:8080"),
    );
    assert_landed(&pair.proxy_dials(POD6, 8080), "inbound", &v6(POD6, 8080));
    // Except on skipped inbound ports.
    assert_landed(&pair.proxy_dials(POD4, 15021), "admin", "none");
}

fn the_legacy_backend_redirects_too() {
    let mut pair = Pair::new();
    let mut flags = INIT_FLAGS.to_vec();
    flags.push("--backend=legacy");
    pair.init_ok(&flags);
    assert!(
        pair.save("legacy")
            .contains("-A OUTPUT -p tcp -j WEFT_OUTBOUND")
    );
    assert!(!pair.save("nft").contains("WEFT_"), "nft untouched");
    listen(&mut pair);
    assert_landed(
        &pair.peer_dials(POD4, 8080),
        "inbound",
        &format!("{POD4}:8080"),
    );
    assert_landed(&pair.app_dials(PEER6, 80), "outbound", &v6(PEER6, 80));
    assert_landed(&pair.proxy_dials(PEER4, 80), "peer", "none");
    assert_landed(&pair.app_dials(FAR4, 80), "peer", "none");
}

/// Some runtimes turn IPv6 off with a sysctl rather than at boot: `ip6tables` still works,
/// but `lo` refuses `::6` with "Permission denied", which init used to report as missing
/// capabilities, failing the pod. Now it succeeds, installs the IPv6 rules (IPv6 traffic
/// still may not go past the proxy) and warns.
fn ipv6_turned_off_by_sysctl_keeps_the_rules_and_skips_the_loopback_address() {
    let pair = Pair::new();
    sh_ok(&[
        "ip",
        "netns",
        "exec",
        &pair.pod,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
    ]);
    let out = pair.init(&[], INIT_FLAGS);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("IPv6 is disabled on lo"), "{stderr}");
    let rules = pair.save("nft");
    assert!(
        rules.contains("-A PREROUTING -p tcp -j WEFT_INBOUND"),
        "{rules}"
    );
    // The IPv6 rules: only they name the IPv6 network skipped outbound.
    assert!(
        rules.contains("-A WEFT_OUTBOUND -d fd00:77:1::/64 -p tcp -j RETURN"),
        "{rules}"
    );
}

fn a_second_run_changes_nothing() {
    for backend in ["nft", "legacy"] {
        let pair = Pair::new();
        let mut flags = INIT_FLAGS.to_vec();
        let choice = format!("--backend={backend}");
        flags.push(&choice);
        pair.init_ok(&flags);
        let first = pair.save(backend);
        assert!(
            first.contains("-A PREROUTING -p tcp -j WEFT_INBOUND"),
            "{first}"
        );
        assert!(
            first.contains("-A WEFT_OUTBOUND -d 198.18.251.0/24 -p tcp -j RETURN"),
            "{first}"
        );
        assert!(
            first.contains("-A WEFT_OUTBOUND -d fd00:77:1::/64 -p tcp -j RETURN"),
            "{first}"
        );
        pair.init_ok(&flags);
        assert_eq!(
            pair.save(backend),
            first,
            "{backend}: a re-run changed the rules"
        );
        // The inbound side's IPv6 source address is on lo, once.
        let lo = sh_ok(&["ip", "-n", &pair.pod, "-6", "addr", "show", "dev", "lo"]);
        assert_eq!(lo.matches("inet6 ::6/128").count(), 1, "{lo}");

        // Different flags replace Weft's rules rather than adding to them, and the
        // original flags bring back exactly the original table.
        pair.init_ok(&["--skip-inbound-ports=15021", &choice]);
        let other = pair.save(backend);
        assert_ne!(other, first);
        assert!(!other.contains("3306"), "{other}");
        assert_eq!(other.matches("-j WEFT_INBOUND\n").count(), 2 + 2, "{other}");
        pair.init_ok(&flags);
        assert_eq!(
            pair.save(backend),
            first,
            "{backend}: flags changed and back"
        );
    }
}

fn auto_prefers_nft_but_keeps_to_the_backend_an_earlier_run_used() {
    let pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    assert!(pair.save("nft").contains("WEFT_OUTBOUND"));
    // Probing did not create a legacy nat table (reading one would).
    let names = sh_ok(&[
        "ip",
        "netns",
        "exec",
        &pair.pod,
        "cat",
        "/proc/net/ip_tables_names",
    ]);
    assert!(!names.lines().any(|t| t == "nat"), "{names}");
    assert!(!pair.save("legacy").contains("WEFT_"));

    let pair = Pair::new();
    let mut flags = INIT_FLAGS.to_vec();
    flags.push("--backend=legacy");
    pair.init_ok(&flags);
    let legacy = pair.save("legacy");
    pair.init_ok(INIT_FLAGS);
    assert_eq!(pair.save("legacy"), legacy, "auto re-ran on legacy");
    assert!(!pair.save("nft").contains("WEFT_"), "no second copy in nft");
}

fn plain_iptables_names_serve_when_the_suffixed_ones_are_missing() {
    // An image with a single iptables: only `iptables-save` and friends, here the nft
    // implementation under its plain names, on a PATH without the suffixed ones.
    let multi = sh_ok(&["sh", "-c", "command -v iptables-nft-save"]);
    let multi = std::fs::canonicalize(multi.trim()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "iptables-save",
        "iptables-restore",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        std::os::unix::fs::symlink(&multi, dir.path().join(name)).unwrap();
    }
    // And `ip`, which adds the inbound side's IPv6 source address.
    let ip = sh_ok(&["sh", "-c", "command -v ip"]);
    std::os::unix::fs::symlink(ip.trim(), dir.path().join("ip")).unwrap();
    let path = format!("PATH={}", dir.path().display());
    let pair = Pair::new();
    let out = pair.init(&["env", &path], INIT_FLAGS);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nft = pair.save("nft");
    assert_eq!(
        nft.matches("-A OUTPUT -p tcp -j WEFT_OUTBOUND").count(),
        2,
        "{nft}"
    );
    // Plain names that are nft do not pass for legacy.
    let mut flags = INIT_FLAGS.to_vec();
    flags.push("--backend=legacy");
    let out = pair.init(&["env", &path], &flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no working iptables backend")
            && stderr.contains("`iptables-legacy-save -t nat` is not installed"),
        "{stderr}"
    );
}

fn dry_run_prints_the_rules_and_changes_nothing() {
    let pair = Pair::new();
    let before = (pair.save("nft"), pair.save("legacy"));
    let mut flags = INIT_FLAGS.to_vec();
    flags.push("--dry-run");
    let out = pair.init(&[], &flags);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!((pair.save("nft"), pair.save("legacy")), before);
    let printed = String::from_utf8(out.stdout).unwrap();
    for line in [
        "-A WEFT_INBOUND -p tcp --dport 9000:9010 -j RETURN",
        "-A WEFT_OUTBOUND -p tcp -d 169.254.169.254/32 -j RETURN",
        "-A WEFT_OUTBOUND -p tcp -d fd00:77:1::/64 -j RETURN",
        "-A WEFT_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A PREROUTING -p tcp -j WEFT_INBOUND",
    ] {
        assert!(printed.contains(line), "missing {line:?} in\n{printed}");
    }
    // What it prints is valid restore input: the kernel's parser accepts each half.
    let (v4, v6) = printed.split_at(printed.find("# IPv6").unwrap());
    for (program, input) in [("iptables-nft-restore", v4), ("ip6tables-nft-restore", v6)] {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pair.pod, program, "--test", "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} --test rejected:\n{input}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!((pair.save("nft"), pair.save("legacy")), before);
}

const PERMISSION_MESSAGE: &str = "weft-proxy init: permission denied changing iptables; \
                                  the init container needs NET_ADMIN and NET_RAW";

fn lacking_permission_fails_with_a_clear_message() {
    let pair = Pair::new();
    let before = pair.save("nft");
    for (what, prefix, backend) in [
        (
            "an unprivileged user",
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ][..],
            "--backend=auto",
        ),
        (
            "root without NET_ADMIN and NET_RAW",
            &["setpriv", "--bounding-set=-net_admin,-net_raw"][..],
            "--backend=auto",
        ),
        (
            "root without NET_ADMIN, legacy",
            &["setpriv", "--bounding-set=-net_admin,-net_raw"][..],
            "--backend=legacy",
        ),
    ] {
        let started = Instant::now();
        let mut flags = INIT_FLAGS.to_vec();
        flags.push(backend);
        let out = pair.init(prefix, &flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: succeeded\n{stderr}");
        assert!(
            stderr.contains(PERMISSION_MESSAGE),
            "{what}: unclear error:\n{stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(20), "{what}: slow");
    }
    assert_eq!(pair.save("nft"), before);
}

fn bad_flags_are_rejected_before_anything_is_touched() {
    // No namespace needed: these fail in flag parsing, before iptables runs.
    for (flag, needle) in [
        (
            "--skip-inbound-ports=15021,70000",
            "\"70000\" is not a port",
        ),
        ("--skip-inbound-ports=9010-9000", "start is after its end"),
        ("--skip-outbound-ports=smtp", "\"smtp\" is not a port"),
        ("--skip-outbound-cidrs=10.0.0.0/33", "prefix length"),
        (
            "--skip-outbound-cidrs=10.0.0/8",
            "not an IPv4 or IPv6 address",
        ),
        ("--inbound-port=0", "--inbound-port"),
        ("--proxy-uid=-1", "--proxy-uid"),
        ("--backend=iptables", "--backend"),
        ("--outbound-port=15006", "must differ"),
    ] {
        let out = Command::new(BIN)
            .args(["init", "--dry-run", flag])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} accepted");
        assert!(stderr.contains(needle), "{flag}: {stderr}");
        assert!(out.stdout.is_empty(), "{flag}: printed rules anyway");
    }
}
