//! `diskkit completions` and `diskkit man`: shell completions and man pages generated from the
//! command-line definitions, so they never drift from `--help`.

use super::util::Out;
use super::{Cli, EXIT_OK};
use clap::CommandFactory;
use clap_complete::Shell;
use diskkit::formats::{Error, Result};

/// Print a shell completion script
#[derive(clap::Args)]
#[command(
    long_about = "Print the completion script for SHELL on stdout. For example:\n\n  \
bash: diskkit completions bash > ~/.local/share/bash-completion/completions/diskkit\n  \
zsh:  diskkit completions zsh > ~/.zfunc/_diskkit  (with ~/.zfunc in $fpath)\n  \
fish: diskkit completions fish > ~/.config/fish/completions/diskkit.fish"
)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    shell: Shell,
}

/// Print a man page (roff)
#[derive(clap::Args)]
#[command(
    long_about = "Print the man page of diskkit, or of one COMMAND (as diskkit-COMMAND), in roff \
on stdout. For example: diskkit man > diskkit.1; diskkit man convert > diskkit-convert.1; \
man ./diskkit.1"
)]
pub struct ManArgs {
    /// The command whose page to print (default: the overview of all commands)
    command: Option<String>,
}

pub fn completions(args: CompletionsArgs) -> Result<i32> {
    // Generated into memory: clap_complete panics when its writer fails.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "diskkit", &mut script);
    print(&script)
}

pub fn man(args: ManArgs) -> Result<i32> {
    let top = Cli::command();
    let page = match &args.command {
        None => top,
        Some(name) => {
            let sub = top
                .find_subcommand(name)
                .ok_or_else(|| Error::invalid(format!("man: no command {name}")))?;
            sub.clone()
                .name(format!("diskkit-{name}"))
                .version(env!("CARGO_PKG_VERSION"))
        }
    };
    let mut roff = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut roff)
        .map_err(|e| Error::invalid(format!("man: {e}")))?;
    print(&roff)
}

fn print(bytes: &[u8]) -> Result<i32> {
    let mut out = Out::new();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(EXIT_OK)
}
