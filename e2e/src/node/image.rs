//! Container images without a registry: a static binary (and links to it) in a one-layer
//! OCI image, written as an OCI archive that `ctr images import` loads into containerd's
//! `k8s.io` namespace, where the kubelet finds it.
//!
//! ```text
//!  static binary ──staging dir──tar──▶ layer ─┐
//!                     config (entrypoint) ────┼─▶ manifest ─▶ index.json ─tar─▶ archive
//! ```
//!
//! The layer is an uncompressed tar (a valid OCI layer media type), so the archive needs
//! nothing but `tar` and `sha256sum`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use serde_json::json;

/// An image to build: its reference, the files it holds and how it starts.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The full reference pods use, such as `weft.test/busybox:1.35.0`.
    pub reference: String,
    /// Files copied into the image: (source on this machine, path inside the image).
    pub files: Vec<(PathBuf, String)>,
    /// Symbolic links inside the image: (link path, target).
    pub links: Vec<(String, String)>,
    /// The image's entrypoint.
    pub entrypoint: Vec<String>,
    /// The image's default arguments.
    pub cmd: Vec<String>,
}

/// Writes `spec` as an OCI archive at `out`, using `work` as scratch space.
pub fn write_archive(spec: &ImageSpec, work: &Path, out: &Path) -> anyhow::Result<()> {
    if work.exists() {
        fs::remove_dir_all(work)?;
    }
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    for dir in ["etc", "tmp", "proc", "sys", "dev", "bin"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    for (src, dest) in &spec.files {
        let target = rootfs.join(dest.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(src, &target)
            .with_context(|| format!("copying {} into {}", src.display(), spec.reference))?;
    }
    for (link, target) in &spec.links {
        let path = rootfs.join(link.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink(target, &path)
            .with_context(|| format!("linking {link} in {}", spec.reference))?;
    }

    let layer = work.join("layer.tar");
    tar(&rootfs, &layer)?;
    let (layer_digest, layer_size) = add_blob(&blobs, &layer)?;

    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    });
    let (config_digest, config_size) = add_json_blob(&blobs, work, "config", &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = add_json_blob(&blobs, work, "manifest", &manifest)?;
    let tag = spec
        .reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": spec.reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    tar(&layout, out)?;
    fs::remove_dir_all(work)?;
    Ok(())
}

/// Tars the contents of `dir` reproducibly (sorted, owned by root, epoch timestamps).
fn tar(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let status = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
        ])
        .arg(out)
        .arg(".")
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar of {} failed ({status})", dir.display());
    }
    Ok(())
}

/// Moves `file` into the blob store under its digest; returns (hex digest, size).
fn add_blob(blobs: &Path, file: &Path) -> anyhow::Result<(String, u64)> {
    let output = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("running sha256sum")?;
    if !output.status.success() {
        bail!("sha256sum of {} failed", file.display());
    }
    let text = String::from_utf8(output.stdout).context("sha256sum output")?;
    let digest = text
        .split_whitespace()
        .next()
        .filter(|d| d.len() == 64)
        .context("sha256sum printed no digest")?
        .to_owned();
    let size = fs::metadata(file)?.len();
    fs::rename(file, blobs.join(&digest))?;
    Ok((digest, size))
}

fn add_json_blob(
    blobs: &Path,
    work: &Path,
    name: &str,
    value: &serde_json::Value,
) -> anyhow::Result<(String, u64)> {
    let path = work.join(format!("{name}.json"));
    fs::write(&path, serde_json::to_vec(value)?)?;
    add_blob(blobs, &path)
}
