//! `cargo xtask lab up | status | down`: builds the lab's binaries and hands over to seine-lab.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::cmd::{cargo_in, check, exec, target_dir};
use crate::setup::{release_bpffs, setup};
use crate::LabAction;

pub(crate) fn lab(root: &Path, action: LabAction) -> Result<()> {
    let verb = match action {
        LabAction::Up => {
            setup()?;
            "up"
        }
        LabAction::Down => "down",
        LabAction::Status => "status",
    };
    check(cargo_in(root).args([
        "build",
        "-p",
        "seine-agent",
        "-p",
        "seine-cni",
        "-p",
        "seine-apiserver",
        "-p",
        "seine-controller-manager",
        "-p",
        "seine-scheduler",
        "-p",
        "seine-dns",
        "-p",
        "seine-tests",
    ]))?;
    let lab = target_dir(root).join("debug/seine-lab");
    if verb == "down" {
        check(Command::new(lab).current_dir(root).arg(verb))?;
        return release_bpffs();
    }
    exec(root, Command::new(lab).arg(verb))
}
