//! seine-pause: the process that holds a pod sandbox's namespaces, as Kubernetes' pause. As PID 1
//! of a pod that shares its process namespace it reaps orphaned children; SIGTERM and SIGINT end
//! it with status 0.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("-v") {
        println!("seine-pause {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    // SAFETY: plain libc signal-mask calls on a zeroed set owned by this frame.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, signal);
        }
        // Blocked signals wait for sigwait instead of running default actions (which PID 1
        // would ignore anyway).
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            eprintln!(
                "seine-pause: sigprocmask: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::FAILURE;
        }
        loop {
            let mut signal = 0;
            if libc::sigwait(&set, &mut signal) != 0 {
                continue;
            }
            match signal {
                libc::SIGCHLD => {
                    while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
                }
                _ => return ExitCode::SUCCESS,
            }
        }
    }
}
