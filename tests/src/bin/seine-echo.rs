//! seine-echo: a test workload that answers HTTP requests and UDP datagrams with its name.

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "seine-echo",
    version,
    about = "Answer HTTP and UDP with this server's name"
)]
struct Args {
    /// The name to answer with (default: $HOSTNAME, which is the pod's name in a pod).
    #[arg(long, env = "HOSTNAME")]
    name: String,
    /// Address for both TCP (HTTP) and UDP.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Also echo raw TCP byte streams back on this address (for bulk transfer checks).
    #[arg(long)]
    stream_echo: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = seine_tests::echo::spawn_all(args.listen, &args.name) {
        eprintln!("seine-echo: listening on {}: {e}", args.listen);
        return ExitCode::from(1);
    }
    if let Some(addr) = args.stream_echo {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                std::thread::spawn(move || seine_tests::echo::serve_stream_echo(listener));
            }
            Err(e) => {
                eprintln!("seine-echo: listening on {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    loop {
        std::thread::park();
    }
}
