//! OCI image archives built here from files of this machine (no registry is reachable): one
//! layer of the given files, a config with the entrypoint, and an index naming the reference,
//! the layout `ctr images import` takes. No Docker or other builder is needed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

/// What goes into an image.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    pub reference: String,
    /// (file on this machine, path in the image).
    pub files: Vec<(PathBuf, String)>,
    /// (link in the image, its target).
    pub links: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// `binary` with the shared libraries it loads (from ldd), at their paths.
pub fn with_libraries(binary: &Path, dest: &str) -> Result<Vec<(PathBuf, String)>> {
    let mut files = vec![(binary.to_path_buf(), dest.to_string())];
    let out = run("ldd", &[&binary.display().to_string()])?;
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            files.push((PathBuf::from(path), path.to_string()));
        }
    }
    Ok(files)
}

/// Stores the file in the layout's blobs by its digest.
fn blob(blobs: &Path, path: &Path) -> Result<(String, u64)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(blobs.join(&digest), &bytes)?;
    Ok((format!("sha256:{digest}"), bytes.len() as u64))
}

/// Runs a command to its end; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the image in `dir` (emptied first); returns the archive's path.
pub fn build(dir: &Path, spec: &ImageSpec) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    let rootfs = dir.join("rootfs");
    let blobs = dir.join("oci/blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    for d in ["proc", "sys", "dev", "etc", "tmp", "bin"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    for (source, dest) in &spec.files {
        let target = rootfs.join(dest.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(source, &target)
            .with_context(|| format!("copying {} into the image", source.display()))?;
    }
    for (link, target) in &spec.links {
        let path = rootfs.join(link.trim_start_matches('/'));
        if !path.exists() {
            std::os::unix::fs::symlink(target, path)?;
        }
    }
    let layer = dir.join("layer.tar");
    run(
        "tar",
        &[
            "-C",
            &rootfs.display().to_string(),
            "--owner=0",
            "--group=0",
            "-cf",
            &layer.display().to_string(),
            ".",
        ],
    )?;
    let (layer_digest, layer_size) = blob(&blobs, &layer)?;
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin:/usr/bin"], "Entrypoint": spec.entrypoint, "Cmd": spec.cmd},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))?,
    )?;
    let (config_digest, config_size) = blob(&blobs, &config)?;
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
        }))?,
    )?;
    let (manifest_digest, manifest_size) = blob(&blobs, &manifest)?;
    std::fs::write(
        dir.join("oci/oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let tag = spec.reference.rsplit(':').next().unwrap_or("latest");
    std::fs::write(
        dir.join("oci/index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": manifest_digest, "size": manifest_size,
                           "annotations": {"io.containerd.image.name": spec.reference,
                                           "org.opencontainers.image.ref.name": tag}}],
        }))?,
    )?;
    let archive = dir.join("image.tar");
    run(
        "tar",
        &[
            "-C",
            &dir.join("oci").display().to_string(),
            "-cf",
            &archive.display().to_string(),
            ".",
        ],
    )?;
    Ok(archive)
}

/// The machine's static busybox with a few applets (package busybox-static).
pub fn busybox(reference: &str) -> ImageSpec {
    let applets = [
        "sh", "ip", "wget", "cat", "sleep", "nc", "ping", "nslookup", "echo", "ls", "httpd",
        "true", "false", "env", "hostname", "test", "kill", "ps",
    ];
    ImageSpec {
        reference: reference.into(),
        files: vec![("/bin/busybox".into(), "/bin/busybox".into())],
        links: applets
            .iter()
            .map(|a| (format!("/bin/{a}"), "busybox".to_string()))
            .collect(),
        entrypoint: vec![],
        cmd: vec!["sh".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_archive_holds_a_layout_that_names_its_reference() {
        let dir = std::env::temp_dir().join(format!("seine-image-{}", std::process::id()));
        let spec = ImageSpec {
            reference: "seine.local/test:1".into(),
            files: vec![("/etc/hostname".into(), "/etc/name".into())],
            links: vec![("/bin/sh".into(), "busybox".into())],
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec![],
        };
        let archive = build(&dir, &spec).unwrap();
        let listing = run("tar", &["-tf", &archive.display().to_string()]).unwrap();
        assert!(
            listing.contains("index.json") && listing.contains("oci-layout"),
            "{listing}"
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("oci/index.json")).unwrap()).unwrap();
        let manifest = &index["manifests"][0];
        assert_eq!(
            manifest["annotations"]["io.containerd.image.name"],
            "seine.local/test:1"
        );
        // Every blob is stored under its own digest.
        let digest = manifest["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let bytes = std::fs::read(dir.join("oci/blobs/sha256").join(digest)).unwrap();
        let actual: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(actual, digest);
        // A second build starts from nothing.
        build(&dir, &spec).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
