use clap::Parser as _;
use seine_kubelet::daemon::{run, Args};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    seine_component_base::init_logging(args.log_json, "info");
    seine_component_base::block_on("seine-kubelet", run(args))
}
