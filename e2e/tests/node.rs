//! The test bed's real node: a pod built from an image made here runs, `kubectl logs` and
//! `exec` reach it, a Service resolves by short name through CoreDNS and kube-proxy routes
//! to it, and nothing is left on the machine afterwards. Needs root (as CI runs).
//!
//! All of it is one test: there is one node per machine, and bringing one up takes tens
//! of seconds.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use weft_e2e::{
    mesh::{Cluster, service_manifest},
    node::{self, Node, TEST_IMAGE, host},
    shared::init_tracing,
};

/// Runs `cmd` (ip, iptables: kubectl goes through [`Cluster`]), returning stdout, or
/// failing with both streams.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().context("spawning")?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}):\nstdout: {}\nstderr: {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Retries `f` every 500 ms for up to `timeout`.
fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn pod_manifest(ns: &str, name: &str, labels: &str, script: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{{labels}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {TEST_IMAGE}
    imagePullPolicy: Never
    command: ["sh", "-c", {script:?}]
"#
    )
}

#[test]
fn a_pod_runs_serves_through_a_service_by_short_name_and_down_leaves_nothing() -> anyhow::Result<()>
{
    init_tracing();
    let started = Instant::now();
    let node = Node::start_attached()?;
    eprintln!("node up in {:.1?}", started.elapsed());
    let cluster = Cluster::of_node(&node);

    // The guard is in place (the node installs it before anything else starts).
    let guard =
        run(Command::new("iptables").args(["-w", "-t", "mangle", "-S", host::GUARD_CHAIN]))?;
    for dev in host::external_interfaces()? {
        assert!(
            guard.contains(&format!("-d {} -o {dev} ", node::GUARDED_RANGE)),
            "no guard rule for {dev}:\n{guard}"
        );
    }
    let postrouting =
        run(Command::new("iptables").args(["-w", "-t", "mangle", "-S", "POSTROUTING"]))?;
    assert!(
        postrouting.contains(&format!("-A POSTROUTING -j {}", host::GUARD_CHAIN)),
        "{postrouting}"
    );

    let ns = format!("node-{:08x}", rand::random::<u32>());
    cluster.run(&["create", "namespace", &ns])?;
    cluster.apply(&pod_manifest(
            &ns,
            "web",
            "app: web",
            "mkdir -p /www && echo hello-from-web > /www/index.html && echo web-started && exec httpd -f -v -p 8080 -h /www",
        ),
    )?;
    cluster.apply(&service_manifest(&ns, "web", "app: web"))?;
    cluster.apply(&pod_manifest(
        &ns,
        "client",
        "app: client",
        "exec sleep 3600",
    ))?;
    for pod in ["web", "client"] {
        cluster
            .run(&[
                "-n",
                &ns,
                "wait",
                "--for=condition=Ready",
                &format!("pod/{pod}"),
                "--timeout=120s",
            ])
            .with_context(|| {
                format!(
                    "pod {pod} not ready; kubelet log:\n{}",
                    node.testbed().log_tail("kubelet", 30)
                )
            })?;
    }

    // kubectl logs and exec reach the container through the API server and the kubelet.
    let logs = eventually(Duration::from_secs(20), || {
        let logs = cluster.run(&["-n", &ns, "logs", "web"])?;
        if logs.contains("web-started") {
            Ok(logs)
        } else {
            bail!("no start line yet: {logs}")
        }
    })?;
    assert!(logs.contains("web-started"), "{logs}");
    let page = cluster.run(&["-n", &ns, "exec", "web", "--", "cat", "/www/index.html"])?;
    assert_eq!(page.trim(), "hello-from-web");

    // kubectl port-forward: a local port on this machine reaches the pod's port.
    let page = port_forward_get(&node, &cluster, &ns).with_context(|| {
        format!(
            "port-forward: {}\ncontainerd: {}",
            node.testbed().log_tail("port-forward", 10),
            node.testbed().log_tail("containerd", 10)
        )
    })?;
    assert!(page.trim_end().ends_with("hello-from-web"), "{page}");

    // From another pod: the short name resolves through CoreDNS to the Service's cluster
    // IP, and kube-proxy carries the request to the web pod.
    let cluster_ip = cluster.run(&[
        "-n",
        &ns,
        "get",
        "service",
        "web",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    // busybox's nslookup also asks for AAAA records along the search path and exits 1
    // when those find nothing, so the answer is read from its output.
    let lookup = eventually(Duration::from_secs(30), || {
        let out = cluster
            .kubectl()
            .args(["-n", &ns, "exec", "client", "--", "nslookup", "web"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains(cluster_ip.trim()) {
            Ok(text)
        } else {
            bail!("nslookup web gave:\n{text}\nexpected {cluster_ip}")
        }
    })?;
    assert!(
        lookup.contains(&format!("web.{ns}.svc.cluster.local")),
        "{lookup}"
    );
    // Debian's busybox is linked statically against glibc: its wget crashes (SIGSEGV,
    // in a chroot as in a pod) without glibc's NSS libraries, so the request is written
    // with nc, to the address the short name resolved to (nslookup above used the pod's
    // resolv.conf and search path itself).
    let request = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {} 80",
        cluster_ip.trim()
    );
    let response = eventually(Duration::from_secs(30), || {
        let text = cluster.run(&["-n", &ns, "exec", "client", "--", "sh", "-c", &request])?;
        if text.contains("200 OK") {
            Ok(text)
        } else {
            bail!("no 200 yet: {text}")
        }
    })?;
    assert!(
        response.trim_end().ends_with("hello-from-web"),
        "{response}"
    );
    // The web server saw the request come from the client pod's own address.
    let client_ip = cluster.run(&[
        "-n",
        &ns,
        "get",
        "pod",
        "client",
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    let logs = cluster.run(&["-n", &ns, "logs", "web"])?;
    assert!(
        logs.contains(&format!("{}]", client_ip.trim())) && logs.contains("response:200"),
        "web's log does not show the client's ({client_ip}) request:\n{logs}"
    );

    // CoreDNS forwards nothing: a name outside the cluster does not resolve.
    let outside = cluster
        .kubectl()
        .args([
            "-n",
            &ns,
            "exec",
            "client",
            "--",
            "nslookup",
            "-type=a",
            "example.com.",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&outside.stdout);
    assert!(
        !outside.status.success() && !text.contains("Name:"),
        "example.com resolved: {text}"
    );

    let root = node.root().to_path_buf();
    let bed_dir = node.testbed().dir().to_path_buf();
    drop(node);
    assert_nothing_left(&root, &bed_dir)
}

/// Runs `kubectl port-forward pod/web :8080`, sends one HTTP request through the local
/// port it prints, and returns the response.
fn port_forward_get(node: &Node, cluster: &Cluster, ns: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, BufReader, Read};
    let mut child = cluster
        .kubectl()
        .args([
            "-n",
            ns,
            "port-forward",
            "pod/web",
            ":8080",
            "--address=127.0.0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(
            node.testbed().dir().join("port-forward.log"),
        )?)
        .spawn()?;
    let result = (|| {
        let stdout = child.stdout.take().context("port-forward stdout")?;
        let mut line = String::new();
        // Kept open until the request is done: kubectl prints a line per connection and
        // dies of SIGPIPE when nobody reads them.
        let mut lines = BufReader::new(stdout);
        lines.read_line(&mut line)?;
        // "Forwarding from 127.0.0.1:40123 -> 8080"
        let port: u16 = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no port in {line:?}"))?;
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        // The forwarded stream may end in a reset after the answer; keep what arrived.
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(e) if response.is_empty() => return Err(e.into()),
                Err(_) => break,
            }
        }
        drop(lines);
        Ok(String::from_utf8_lossy(&response).into_owned())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Checks that the node left nothing on this machine.
fn assert_nothing_left(root: &Path, bed_dir: &Path) -> anyhow::Result<()> {
    assert!(!root.exists(), "{} remains", root.display());
    assert!(!bed_dir.exists(), "{} remains", bed_dir.display());
    let link = Command::new("ip")
        .args(["link", "show", node::BRIDGE])
        .output()?;
    assert!(
        !link.status.success(),
        "the bridge {} remains",
        node::BRIDGE
    );
    let chain = Command::new("iptables")
        .args(["-w", "-t", "mangle", "-S", host::GUARD_CHAIN])
        .output()?;
    assert!(!chain.status.success(), "the guard chain remains");
    let nat = run(Command::new("iptables").args(["-w", "-t", "nat", "-S"]))?;
    assert!(
        !nat.contains("KUBE-SERVICES"),
        "kube-proxy's chains remain:\n{nat}"
    );
    let routes = run(Command::new("ip").args(["route", "show"]))?;
    assert!(
        !routes.contains(node::SERVICE_CIDR),
        "routes remain:\n{routes}"
    );
    assert!(
        !routes.contains(node::GUARDED_RANGE),
        "routes remain:\n{routes}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mounts.contains(&root.display().to_string()),
        "mounts under {} remain",
        root.display()
    );
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let dir = h.path().join(node::CGROUP_ROOT);
        assert!(!dir.exists(), "cgroup {} remains", dir.display());
    }
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline);
            assert!(
                !(cmdline.contains("containerd-shim")
                    && cmdline.contains(&root.display().to_string())),
                "a shim remains: {cmdline}"
            );
        }
    }
    Ok(())
}

/// The guard's rules, installed in a throwaway network namespace whose only "external"
/// interface is one end of a veth pair whose other end is in the same namespace (so
/// nothing can leave it): a packet to the guarded range is refused, one to another
/// address is not.
#[test]
fn the_guard_drops_the_guarded_range_leaving_an_external_interface() -> anyhow::Result<()> {
    init_tracing();
    let ns = format!("weft-guard-{:08x}", rand::random::<u32>());
    run(Command::new("ip").args(["netns", "add", &ns]))?;
    let result = (|| -> anyhow::Result<()> {
        for args in [
            vec!["link", "set", "lo", "up"],
            // Both ends of the pair stay in the namespace (no dummy driver here).
            vec![
                "link", "add", "ext0", "type", "veth", "peer", "name", "ext0peer",
            ],
            vec!["addr", "add", "198.51.100.2/24", "dev", "ext0"],
            vec!["link", "set", "ext0", "up"],
            vec!["link", "set", "ext0peer", "up"],
            vec![
                "route",
                "add",
                "default",
                "via",
                "198.51.100.1",
                "dev",
                "ext0",
            ],
        ] {
            run(Command::new("ip").args(["-n", &ns]).args(&args))?;
        }
        host::install_guard(Some(&ns), &["ext0".to_owned()])?;
        // Installing twice leaves one rule and one jump.
        host::install_guard(Some(&ns), &["ext0".to_owned()])?;
        let send = |addr: &str| {
            Command::new("ip")
                .args(["netns", "exec", &ns, "bash", "-c"])
                .arg(format!("echo probe > /dev/udp/{addr}/9"))
                .output()
        };
        let guarded = send("198.18.239.254")?;
        assert!(
            !guarded.status.success(),
            "a packet to the guarded range was sent"
        );
        assert!(
            String::from_utf8_lossy(&guarded.stderr).contains("Operation not permitted"),
            "{}",
            String::from_utf8_lossy(&guarded.stderr)
        );
        let other = send("198.51.100.9")?;
        assert!(
            other.status.success(),
            "a packet outside the guarded range was refused too: {}",
            String::from_utf8_lossy(&other.stderr)
        );
        let counters = run(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "iptables",
            "-w",
            "-t",
            "mangle",
            "-L",
            host::GUARD_CHAIN,
            "-v",
            "-x",
            "-n",
        ]))?;
        let drops: Vec<&str> = counters.lines().filter(|l| l.contains("DROP")).collect();
        assert_eq!(drops.len(), 1, "{counters}");
        let packets = drops[0].split_whitespace().next().unwrap_or("");
        assert_eq!(packets, "1", "{counters}");
        let jumps = run(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "iptables",
            "-w",
            "-t",
            "mangle",
            "-S",
            "POSTROUTING",
        ]))?;
        assert_eq!(jumps.matches(host::GUARD_CHAIN).count(), 1, "{jumps}");
        Ok(())
    })();
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    result
}
