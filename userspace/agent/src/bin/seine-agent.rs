//! seine-agent: the node agent. Runs the service datapath — eBPF (maps pinned per node, programs
//! attached to pod veths) or, where eBPF cannot be used, nftables or iptables — and programs
//! services from a watched file of Service and EndpointSlice objects, and pods' hostPorts from
//! what seine-cni records (attaching the eBPF programs to the uplinks that carry them). Serves
//! /healthz, /readyz and /metrics; stops on SIGTERM leaving the datapath in place, so a restart
//! breaks no connection.

fn main() -> std::process::ExitCode {
    seine_agent::daemon::main()
}
