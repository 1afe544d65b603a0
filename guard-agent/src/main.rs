//! `guard-agent`: the agent daemon and its command line.

fn main() {
    std::process::exit(guard_agent::cli::main());
}
