//! diskkit command line: parses arguments and hands work to the engine.

mod cli;

fn main() {
    // Any command may be writing temporary files: interrupted, it removes them.
    diskkit::output::remove_temps_on_signals();
    std::process::exit(cli::run());
}
