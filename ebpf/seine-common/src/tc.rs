//! Attaching the tc programs to an interface (userspace only): the agent with the programs it
//! loaded, the CNI plugin with the ones the agent pinned. Seine's filter has a fixed priority and
//! handle, so a restarted agent replaces its own filter in place instead of stacking a second one.

use std::path::Path;

use aya::programs::{
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    SchedClassifier, TcAttachType,
};

use crate::{PROG_FROM_POD, PROG_TO_POD};

const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0x5e1, 1);

/// The programs and the direction each is attached in: ingress translates what the pod sends,
/// egress restores replies.
pub const PROGRAMS: [(&str, TcAttachType); 2] = [
    (PROG_FROM_POD, TcAttachType::Ingress),
    (PROG_TO_POD, TcAttachType::Egress),
];

/// Why attaching failed, for `interface`.
#[derive(Debug, thiserror::Error)]
#[error("attaching to {interface}: {message}")]
pub struct AttachError {
    pub interface: String,
    pub message: String,
}

fn error(interface: &str, message: String) -> AttachError {
    AttachError {
        interface: interface.to_string(),
        message,
    }
}

/// Adds the clsact qdisc to `interface` unless it is there.
pub fn add_clsact(interface: &str) -> Result<(), AttachError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(()),
        // EEXIST (17): the clsact qdisc is there already.
        Err(tc::TcError::NetlinkError(n)) if n.raw_os_error() == Some(17) => Ok(()),
        Err(e) => Err(error(interface, format!("adding clsact qdisc: {e}"))),
    }
}

/// Attaches `prog` (named `name`) to `interface` in `attach_type`; an existing Seine filter is
/// replaced in place, so packets never pass untranslated. The filter stays after this process
/// exits.
pub fn attach_one(
    prog: &mut SchedClassifier,
    name: &str,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<(), AttachError> {
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
        classid: None,
    });
    let link_id = match prog.attach_with_options(interface, attach_type, options) {
        Ok(id) => id,
        // Our filter is there already (an earlier agent): swap the program in place.
        Err(create_err) => {
            let existing =
                SchedClassifierLink::attached(interface, attach_type, TC_PRIORITY, TC_HANDLE, None)
                    .map_err(|e| error(interface, format!("{name}: {e}")))?;
            prog.attach_to_link(existing).map_err(|e| {
                error(
                    interface,
                    format!("{name}: creating the filter: {create_err}; replacing it: {e}"),
                )
            })?
        }
    };
    // Keep the filter when this process exits: dropping the link would detach it.
    let link = prog
        .take_link(link_id)
        .map_err(|e| error(interface, format!("{name}: {e}")))?;
    std::mem::forget(link);
    Ok(())
}

/// Attaches the programs an agent pinned in `dir` to `interface` (current network namespace), as
/// the CNI plugin does for a new pod. Returns false, attaching nothing, when no agent pinned them
/// there (the iptables datapath, or no agent).
pub fn attach_pinned(dir: &Path, interface: &str) -> Result<bool, AttachError> {
    if !PROGRAMS.iter().all(|(name, _)| dir.join(name).exists()) {
        return Ok(false);
    }
    add_clsact(interface)?;
    for (name, attach_type) in PROGRAMS {
        let mut prog = SchedClassifier::from_pin(dir.join(name))
            .map_err(|e| error(interface, format!("{name}: {e}")))?;
        attach_one(&mut prog, name, interface, attach_type)?;
    }
    Ok(true)
}

/// Removes Seine's filters from `interface` (current network namespace), if any.
pub fn detach(interface: &str) {
    for (name, attach_type) in PROGRAMS {
        let _ = tc::qdisc_detach_program(interface, attach_type, name);
    }
}
