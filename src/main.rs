//! diskkit command line: parses arguments and hands work to the engine.

mod cli;

fn main() {
    std::process::exit(cli::run());
}
