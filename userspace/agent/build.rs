//! Builds the eBPF object (nightly, bpfel-unknown-none, through bpf-linker) and leaves it in OUT_DIR,
//! where `src/datapath/ebpf.rs` embeds it. `cargo xtask setup` installs what this needs.

use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let root = manifest_dir.join("../../ebpf/seine-ebpf");
    let root = root
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", root.display()))?;
    let root_dir = root.to_str().context("eBPF crate path is not UTF-8")?;
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../../ebpf/seine-common").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "seine-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` first (nightly rust-src and bpf-linker)")
}
