//! seine-cni: the CNI plugin a runtime (containerd, CRI-O, the kubelet's runtime) execs for every
//! pod sandbox. Reads the CNI_* environment and the network configuration on stdin, prints the
//! result (or the spec's error JSON) on stdout.

use std::{io::Read as _, process::ExitCode};

use seine_cni::{
    plugin::{self, Env},
    spec::{self, CniError, Code},
};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors answer in the version the caller asked for when it can be read, else the latest.
    let version = spec::requested_version(&stdin)
        .filter(|v| spec::supports(v))
        .unwrap_or_else(|| spec::LATEST_VERSION.to_string());
    let outcome = match read {
        Err(e) => Err(CniError::new(
            Code::IoFailure,
            "reading the network configuration from stdin",
            e.to_string(),
        )),
        Ok(_) => {
            Env::from_lookup(|k| std::env::var(k).ok()).and_then(|env| plugin::run(&env, &stdin))
        }
    };
    match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
