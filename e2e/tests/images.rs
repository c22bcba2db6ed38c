//! The images `images/build` makes from the project's Dockerfile, checked the way a node
//! uses them: the image config a kubelet reads (user, entrypoint, labels), the binaries run
//! from each image's own file system as the image's user, `weft-proxy init` with the
//! injector's own arguments installing the redirect with the image's iptables in a fresh
//! network namespace, and the archives `ctr images import` reads.
//!
//! ```text
//!  images/build ─▶ buildah storage ─┬─ inspect ─▶ config (user, entrypoint, labels)
//!                                   ├─ from + mount ─▶ rootfs ─▶ chroot: --version, run, init
//!                                   └─ out/*.tar ─▶ manifest.json (RepoTags, config digest)
//! ```
//!
//! Slow (the first build compiles both release binaries: about 15 minutes on 2 cores),
//! and it needs root, buildah, debootstrap and the network to deb.debian.org and
//! crates.io, so `cargo test --workspace` leaves it out (`#[ignore]`); `make images-test`
//! runs it, after a build that is cached when nothing changed.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Container, PodSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::Value;
use weft_inject::{InjectConfig, keys};

const OPERATOR_IMAGE_REPO: &str = "ghcr.io/weft-mesh/weft-operator";
/// distroless's `nonroot`, which the Dockerfile sets.
const OPERATOR_UID: u32 = 65532;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn build_script() -> PathBuf {
    workspace().join("images/build")
}

fn state_dir() -> PathBuf {
    std::env::var_os("WEFT_IMAGES_DIR").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/weft/images"),
        PathBuf::from,
    )
}

fn proxy_image() -> String {
    InjectConfig::default().proxy_image
}

fn operator_image() -> String {
    format!("{OPERATOR_IMAGE_REPO}:{}", env!("CARGO_PKG_VERSION"))
}

/// The init and proxy containers the injector adds to a pod, with default settings.
fn demo_app_image() -> String {
    format!(
        "ghcr.io/weft-mesh/weft-demo-app:{}",
        env!("CARGO_PKG_VERSION")
    )
}

fn injected() -> (Container, Container) {
    let mut meta = ObjectMeta::default();
    let mut spec = PodSpec {
        containers: vec![Container {
            name: "app".to_owned(),
            image: Some("app".to_owned()),
            ..Default::default()
        }],
        ..Default::default()
    };
    weft_inject::inject(&mut meta, &mut spec, &InjectConfig::default()).unwrap();
    let inits = spec.init_containers.unwrap();
    let find = |name: &str| inits.iter().find(|c| c.name == name).unwrap().clone();
    (find(keys::INIT_CONTAINER), find(keys::PROXY_CONTAINER))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// buildah on the build's own storage.
fn buildah(args: &[&str]) -> String {
    stdout(Command::new(build_script()).arg("buildah").args(args))
}

/// Builds the images once per test process (cached by images/build itself across runs);
/// returns the build's log.
fn built() -> &'static str {
    static BUILT: OnceLock<String> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = run(Command::new(build_script()).current_dir(workspace()));
        String::from_utf8_lossy(&out.stderr).into_owned()
    })
}

/// The OCI config of a built image.
fn config(image: &str) -> Value {
    built();
    let inspect: Value =
        serde_json::from_str(&buildah(&["inspect", "--type", "image", image])).unwrap();
    inspect["OCIv1"]["config"].clone()
}

fn image_id(image: &str) -> String {
    built();
    buildah(&[
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.FromImageID}}",
        image,
    ])
    .trim()
    .to_owned()
}

/// The image config's `Env`, as a runtime starts a container with it.
fn image_env(config: &Value) -> BTreeMap<String, String> {
    strings(&config["Env"])
        .into_iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not an array"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// A working container of an image with its file system mounted; removed on drop.
struct Rootfs {
    container: String,
    path: PathBuf,
}

impl Rootfs {
    fn of(image: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        built();
        // The name tells images/build, which removes working containers left behind, that
        // this one belongs to a live test.
        let name = format!(
            "weft-image-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let container = buildah(&["from", "--pull=never", "--quiet", "--name", &name, image])
            .trim()
            .to_owned();
        let path = PathBuf::from(buildah(&["mount", &container]).trim());
        Rootfs { container, path }
    }

    /// `chroot --userspec=uid:uid` into the rootfs, with the image's environment only.
    fn command(&self, uid: u32, argv: &[String]) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(format!("--userspec={uid}:{uid}"))
            .arg(&self.path)
            .args(argv)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            );
        cmd
    }

    /// Starts `argv` in the rootfs as a container runtime would: as `uid`, with only `env`,
    /// the root file system read-only (as the injector and the chart set it), `/proc` and
    /// `/dev` mounted; in a mount namespace of its own. The child is `argv[0]` itself (the
    /// shell and chroot exec), so a signal to it reaches the binary.
    fn spawn(&self, uid: u32, argv: &[String], env: &BTreeMap<String, String>) -> Child {
        let script = format!(
            "set -e; R='{root}'; mount --bind \"$R\" \"$R\"; mount -o remount,bind,ro \"$R\"\n\
             {CONTAINER_MOUNTS}\
             exec chroot --userspec={uid}:{uid} \"$R\" {argv}",
            root = self.path.display(),
            argv = shell_words(argv)
        );
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(&script)
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn exists(&self, path: &str) -> bool {
        self.path
            .join(path.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok()
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = Command::new(build_script())
            .args(["buildah", "rm", &self.container])
            .stdout(Stdio::null())
            .status();
    }
}

/// Shell that gives the mounted rootfs `$R` what a container runtime gives a container:
/// `/proc`, and a `/dev` with the usual device nodes (the image's own `/dev` is empty, and
/// spawning a child with a null stdin opens `/dev/null`). Run inside `unshare --mount`.
const CONTAINER_MOUNTS: &str = r#"mount -t proc proc "$R/proc"
mount -t tmpfs -o mode=755,size=64k tmpfs "$R/dev"
for n in null zero full random urandom tty; do
  touch "$R/dev/$n"
  mount --bind "/dev/$n" "$R/dev/$n"
done
"#;

/// `'a' 'b'`: argv for `sh -c`. The arguments come from this test, never contain `'`.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            assert!(!a.contains('\''), "{a}");
            format!("'{a}'")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn git_head() -> String {
    stdout(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(workspace()),
    )
    .trim()
    .to_owned()
}

fn assert_labels(config: &Value, title: &str) {
    let labels: BTreeMap<String, String> =
        serde_json::from_value(config["Labels"].clone()).unwrap();
    let want = [
        ("org.opencontainers.image.title", title.to_owned()),
        (
            "org.opencontainers.image.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
        ("org.opencontainers.image.revision", git_head()),
        ("org.opencontainers.image.licenses", "Apache-2.0".to_owned()),
    ];
    for (key, value) in want {
        assert_eq!(labels.get(key), Some(&value), "label {key} in {labels:?}");
    }
    for key in [
        "org.opencontainers.image.description",
        "org.opencontainers.image.source",
    ] {
        assert!(labels.contains_key(key), "label {key} missing: {labels:?}");
    }
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn proxy_image_runs_as_the_uid_the_injector_exempts() {
    let cfg = InjectConfig::default();
    let config = config(&proxy_image());
    // Numeric, or the kubelet cannot check the injected container's runAsNonRoot.
    assert_eq!(
        config["User"],
        format!("{0}:{0}", cfg.proxy_uid),
        "the proxy image's user is the UID `weft-proxy init --proxy-uid` exempts"
    );
    // The injector sets args only (`run`, `init ...`), so the entrypoint is the binary.
    assert_eq!(
        strings(&config["Entrypoint"]),
        ["/usr/local/bin/weft-proxy"]
    );
    let (init, proxy) = injected();
    for c in [&init, &proxy] {
        assert_eq!(c.command, None, "{}", c.name);
        assert_eq!(
            c.image.as_deref(),
            Some(proxy_image().as_str()),
            "{}",
            c.name
        );
    }
    assert_labels(&config, "weft-proxy");
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn operator_image_runs_as_nonroot() {
    let config = config(&operator_image());
    assert_eq!(config["User"], format!("{OPERATOR_UID}:{OPERATOR_UID}"));
    assert_eq!(
        strings(&config["Entrypoint"]),
        ["/usr/local/bin/weft-operator"]
    );
    assert_labels(&config, "weft-operator");
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn demo_app_image_runs_its_binary_as_nonroot() {
    let config = config(&demo_app_image());
    assert_eq!(config["User"], format!("{OPERATOR_UID}:{OPERATOR_UID}"));
    assert_eq!(
        strings(&config["Entrypoint"]),
        ["/usr/local/bin/weft-demo-app"]
    );
    assert_labels(&config, "weft-demo-app");
    let rootfs = Rootfs::of(&demo_app_image());
    let out = stdout(&mut rootfs.command(
        OPERATOR_UID,
        &[
            "/usr/local/bin/weft-demo-app".to_owned(),
            "--version".to_owned(),
        ],
    ));
    assert_eq!(
        out.trim(),
        format!("weft-demo-app {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn binaries_run_from_their_images_as_the_images_users() {
    let version = env!("CARGO_PKG_VERSION");
    let cfg = InjectConfig::default();
    let proxy = Rootfs::of(&proxy_image());
    let out = stdout(&mut proxy.command(
        u32::try_from(cfg.proxy_uid).unwrap(),
        &[
            "/usr/local/bin/weft-proxy".to_owned(),
            "--version".to_owned(),
        ],
    ));
    assert_eq!(out.trim(), format!("weft-proxy {version}"));

    let operator = Rootfs::of(&operator_image());
    let out = stdout(&mut operator.command(
        OPERATOR_UID,
        &[
            "/usr/local/bin/weft-operator".to_owned(),
            "--version".to_owned(),
        ],
    ));
    assert_eq!(out.trim(), format!("weft-operator {version}"));
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn images_carry_no_build_tools_and_no_test_authenticator() {
    for image in [proxy_image(), operator_image()] {
        let rootfs = Rootfs::of(&image);
        for tool in [
            "/usr/bin/cc",
            "/usr/bin/gcc",
            "/usr/bin/ld",
            "/usr/bin/as",
            "/usr/bin/make",
            "/usr/local/cargo",
            "/usr/local/rust",
            "/usr/bin/cargo",
            "/usr/bin/rustc",
            "/src",
            "/out",
        ] {
            assert!(!rootfs.exists(tool), "{image} contains {tool}");
        }
    }
    let operator = Rootfs::of(&operator_image());
    // distroless: nothing to exec into.
    assert!(!operator.exists("/usr/bin/sh") && !operator.exists("/usr/bin/bash"));
    assert!(operator.exists("/etc/ssl/certs/ca-certificates.crt"));
    // The marker text of the `insecure-test-auth` authenticator (see .ci/run).
    let binary = std::fs::read(operator.path.join("usr/local/bin/weft-operator")).unwrap();
    let marker = b"insecure-test-auth: trusting the pod header";
    assert!(
        !binary.windows(marker.len()).any(|w| w == marker),
        "the image's operator contains the insecure-test-auth authenticator"
    );
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn injected_init_container_installs_the_redirect_with_the_images_iptables() {
    let cfg = InjectConfig::default();
    let rootfs = Rootfs::of(&proxy_image());
    let entrypoint = strings(&config(&proxy_image())["Entrypoint"]);
    let (init, _) = injected();
    let argv: Vec<String> = entrypoint
        .into_iter()
        .chain(init.args.unwrap_or_default())
        .collect();
    // A pod's network namespace of its own, /proc and /dev as the container runtime mounts
    // them, then the init container as the injector writes it (root, the image's
    // binaries), then what the image's own iptables-save and ip see.
    let script = format!(
        "set -e; R='{root}'\n{CONTAINER_MOUNTS}\
         chroot \"$R\" {argv}\n\
         echo '--- v4'; chroot \"$R\" iptables-nft-save -t nat\n\
         echo '--- v6'; chroot \"$R\" ip6tables-nft-save -t nat\n\
         echo '--- lo'; chroot \"$R\" ip -6 addr show dev lo\n",
        root = rootfs.path.display(),
        argv = shell_words(&argv)
    );
    let out = String::from_utf8(
        run(Command::new("unshare")
            .args([
                "--net",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
            ])
            .arg(&script))
        .stdout,
    )
    .unwrap();
    let (v4, rest) = out.split_once("--- v6").unwrap();
    let (v6, lo) = rest.split_once("--- lo").unwrap();
    let uid_rule = format!("-m owner --uid-owner {} -j RETURN", cfg.proxy_uid);
    for (family, rules) in [("v4", v4), ("v6", v6)] {
        assert!(
            rules.contains("-A PREROUTING -p tcp -j WEFT_INBOUND"),
            "{family}:\n{rules}"
        );
        assert!(
            rules.contains("-A OUTPUT -p tcp -j WEFT_OUTBOUND"),
            "{family}:\n{rules}"
        );
        assert!(
            rules.contains(&format!("--to-ports {}", cfg.ports.outbound)),
            "{family}:\n{rules}"
        );
        assert!(rules.contains(&uid_rule), "{family}:\n{rules}");
    }
    assert!(lo.contains("inet6 ::6/128"), "lo:\n{lo}");
}

/// SIGTERM, then the process's standard error (SIGKILL if it outlives 10 s).
fn stop(mut child: Child) -> String {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still ours: not reaped yet, so the pid cannot have been reused.
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A free loopback port (the proxy binds it; a race with another binder is possible but
/// only on a busy machine, and shows as a bind error in the failure message).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn proxy_serves_from_a_read_only_image_as_its_user() {
    let cfg = InjectConfig::default();
    let rootfs = Rootfs::of(&proxy_image());
    let config = config(&proxy_image());
    let admin = free_port();
    // The image's entrypoint and environment with the injected container's args and env
    // (its fields from the downward API filled in), the listeners moved to free loopback
    // ports and the operator to a closed one; the root file system read-only, as the
    // injector sets it.
    let (_, container) = injected();
    let mut argv = strings(&config["Entrypoint"]);
    argv.extend(container.args.unwrap());
    let mut env = image_env(&config);
    for var in container.env.unwrap() {
        let value = var.value.unwrap_or_else(|| "images-test".to_owned());
        env.insert(var.name, value);
    }
    for (name, value) in [
        (keys::env::ADMIN_ADDR, format!("127.0.0.1:{admin}")),
        (
            keys::env::OUTBOUND_ADDR,
            format!("127.0.0.1:{}", free_port()),
        ),
        (
            keys::env::INBOUND_ADDR,
            format!("127.0.0.1:{}", free_port()),
        ),
        (
            keys::env::OPERATOR_ADDR,
            format!("127.0.0.1:{}", free_port()),
        ),
    ] {
        assert!(env.contains_key(name), "the injector sets {name}");
        env.insert(name.to_owned(), value);
    }
    let mut child = rootfs.spawn(u32::try_from(cfg.proxy_uid).unwrap(), &argv, &env);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut live = None;
    while Instant::now() < deadline {
        if let Some(reply) = get(admin, "/live") {
            live = Some(reply);
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let running = child.try_wait().unwrap().is_none();
    let log = stop(child);
    assert!(running, "the proxy exited early:\n{log}");
    let live = live.unwrap_or_else(|| panic!("no answer on /live within 20 s:\n{log}"));
    assert!(live.starts_with("HTTP/1.1 200"), "{live}\n{log}");
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn archives_name_the_images_for_ctr_import() {
    for (image, file) in [
        (proxy_image(), "weft-proxy.tar"),
        (operator_image(), "weft-operator.tar"),
        (demo_app_image(), "weft-demo-app.tar"),
    ] {
        let id = image_id(&image);
        let archive = state_dir().join("out").join(file);
        let manifest = stdout(
            Command::new("tar")
                .arg("-xOf")
                .arg(&archive)
                .arg("manifest.json"),
        );
        let manifest: Value = serde_json::from_str(&manifest).unwrap();
        assert_eq!(strings(&manifest[0]["RepoTags"]), vec![image.clone()]);
        // The archive holds this build's image, not an older one.
        assert_eq!(manifest[0]["Config"], format!("{id}.json"), "{image}");
    }
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn a_second_build_with_nothing_changed_changes_nothing() {
    let before = [image_id(&proxy_image()), image_id(&operator_image())];
    let archive = state_dir().join("out/weft-proxy.tar");
    let written = std::fs::metadata(&archive).unwrap().modified().unwrap();
    let out = run(Command::new(build_script()).current_dir(workspace()));
    let log = String::from_utf8_lossy(&out.stderr);
    let after = [image_id(&proxy_image()), image_id(&operator_image())];
    assert_eq!(before, after, "{log}");
    assert!(log.contains("base images are current"), "{log}");
    assert!(log.contains("weft-proxy.tar is current"), "{log}");
    assert_eq!(
        std::fs::metadata(&archive).unwrap().modified().unwrap(),
        written,
        "the archive was rewritten"
    );
}

#[test]
#[ignore = "builds images: needs root, buildah and the network; run with `make images-test`"]
fn operator_from_its_image_reaches_the_api_server_and_takes_the_lease() {
    let bed = weft_e2e::shared::testbed();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (client, ns) = rt.block_on(async {
        let client = weft_e2e::shared::client().await.unwrap();
        weft_e2e::shared::install_crds(&client).await.unwrap();
        let ns = weft_e2e::shared::namespace(&client, "images")
            .await
            .unwrap();
        (client, ns)
    });
    let image = operator_image();
    let config = config(&image);
    let rootfs = Rootfs::of(&image);
    // A self-contained kubeconfig (certificates inline) the image's user can read, in the
    // container's own writable layer, as a mounted Secret would be.
    let kubeconfig = stdout(bed.kubectl().args(["config", "view", "--raw", "--flatten"]));
    let home = rootfs.path.join("home/nonroot");
    std::fs::write(home.join("kubeconfig"), kubeconfig).unwrap();
    run(Command::new("chown")
        .arg(format!("{OPERATOR_UID}:{OPERATOR_UID}"))
        .arg(home.join("kubeconfig")));

    let admin = free_port();
    let mut argv = strings(&config["Entrypoint"]);
    argv.extend([
        format!("--push-addr=127.0.0.1:{}", free_port()),
        format!("--admin-addr=127.0.0.1:{admin}"),
        format!("--identity-addr=127.0.0.1:{}", free_port()),
        format!("--lease-namespace={ns}"),
        format!("--watch-namespace={ns}"),
        "--identity=from-image".to_owned(),
        "--no-webhook".to_owned(),
    ]);
    let mut env = image_env(&config);
    env.insert(
        "KUBECONFIG".to_owned(),
        "/home/nonroot/kubeconfig".to_owned(),
    );
    let child = rootfs.spawn(OPERATOR_UID, &argv, &env);

    // The status writer's Lease, held by this process: it authenticated to the API server
    // over TLS with the image's own libraries, as the image's user, on a read-only root.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client, &ns);
    let held = rt.block_on(weft_e2e::shared::eventually(
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            async move {
                let lease = leases.get("weft-operator").await?;
                let holder = lease.spec.and_then(|s| s.holder_identity);
                anyhow::ensure!(holder.as_deref() == Some("from-image"), "holder {holder:?}");
                Ok(())
            }
        },
    ));
    // Readiness follows the last watch's first list, which may land just after the Lease.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let answer = get(admin, "/readyz");
        let ok = answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200"));
        if ok || std::time::Instant::now() >= deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = stop(child);
    held.unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{log}"));
    let ready = ready.unwrap_or_else(|| panic!("no answer on /readyz\n{log}"));
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}\n{log}");
}
