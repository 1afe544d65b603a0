//! `guard-agent`: the agent daemon and its command line.

fn main() {
    guard_agent::allocator::tune_for_body_buffers();
    std::process::exit(guard_agent::cli::main());
}
