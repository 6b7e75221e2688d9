//! `cargo xtask image`: the images Seine runs from, built here as OCI archives (no registry and
//! no Docker needed) and imported into containerd's `k8s.io` namespace, where the kubelet's
//! runtime finds them: `seine` (the release binaries, for the DaemonSet and static pods), the
//! pod sandbox image `pause` (seine-pause), and the demo server `seine-echo` with busybox beside
//! it, so that `kubectl exec POD -- sh`, `wget` and `nslookup` work in it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};
use seine_image::{busybox, with_libraries, ImageSpec};

use crate::cmd::{cargo_in, check, output, target_dir};

/// The registry part of the images' references; nothing is pulled from it.
pub(crate) const REGISTRY: &str = "seine.local";
const TAG: &str = env!("CARGO_PKG_VERSION");

/// The binaries of the `seine` image, by package.
const BINARIES: &[(&str, &[&str])] = &[
    ("seine-agent", &["seine-agent", "seinectl"]),
    ("seine-cni", &["seine-cni"]),
    ("seine-dns", &["seine-dns"]),
    ("seine-kubelet", &["seine-kubelet", "seine-pause"]),
    ("seine-apiserver", &["seine-apiserver"]),
    ("seine-controller-manager", &["seine-controller-manager"]),
    ("seine-scheduler", &["seine-scheduler"]),
    ("seine-tests", &["seine-echo"]),
];

pub(crate) fn image(root: &Path, out: Option<PathBuf>, containerd: Option<PathBuf>) -> Result<()> {
    crate::setup::setup()?;
    let mut build = cargo_in(root);
    build.args(["build", "--release"]);
    for (package, _) in BINARIES {
        build.args(["-p", package]);
    }
    check(&mut build)?;
    let release = target_dir(root).join("release");
    let out = out.unwrap_or_else(|| target_dir(root).join("images"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let reference = |name: &str| format!("{REGISTRY}/{name}:{TAG}");
    let mut seine = ImageSpec {
        reference: reference("seine"),
        cmd: vec!["seine-agent".into()],
        ..Default::default()
    };
    for binary in BINARIES.iter().flat_map(|(_, bins)| bins.iter()) {
        seine.files.extend(with_libraries(
            &release.join(binary),
            &format!("/bin/{binary}"),
        )?);
    }
    let pause = ImageSpec {
        reference: reference("pause"),
        files: with_libraries(&release.join("seine-pause"), "/pause")?,
        entrypoint: vec!["/pause".into()],
        ..Default::default()
    };
    let mut echo = busybox(&reference("seine-echo"));
    echo.files.extend(with_libraries(
        &release.join("seine-echo"),
        "/bin/seine-echo",
    )?);
    echo.entrypoint = vec!["/bin/seine-echo".into()];
    echo.cmd = vec![];

    let socket = containerd.unwrap_or_else(|| "/run/containerd/containerd.sock".into());
    for spec in [seine, pause, echo] {
        let name = spec
            .reference
            .trim_start_matches(&format!("{REGISTRY}/"))
            .split(':')
            .next()
            .unwrap_or("image")
            .to_string();
        let work = target_dir(root).join("image-build").join(&name);
        let archive = seine_image::build(&work, &spec)?;
        let dest = out.join(format!("{name}.tar"));
        std::fs::rename(&archive, &dest)
            .or_else(|_| std::fs::copy(&archive, &dest).map(|_| ()))
            .with_context(|| format!("writing {}", dest.display()))?;
        let _ = std::fs::remove_dir_all(&work);
        let size = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
        println!(
            "image: {} ... {} ({:.1} MiB)",
            spec.reference,
            dest.display(),
            size as f64 / (1 << 20) as f64
        );
        if socket.exists() {
            output(
                Command::new("ctr")
                    .arg("--address")
                    .arg(&socket)
                    .args(["-n", "k8s.io", "images", "import"])
                    .arg(&dest),
            )?;
            println!(
                "image: {} ... imported into containerd ({})",
                spec.reference,
                socket.display()
            );
        }
    }
    if !socket.exists() {
        println!(
            "image: no containerd at {}; import with: ctr -n k8s.io images import {}/<name>.tar",
            socket.display(),
            out.display()
        );
    }
    Ok(())
}
