//! What the commands that change a qcow2 image in place share (`snapshot -c|-a|-d`, `amend`,
//! `bitmap`): the format check and the crash-test stop points.

use diskkit::formats::qcow2::edit;
use diskkit::formats::{Error, Format, HostFile, Result, detect};
use std::path::Path;

/// The environment variable that stops an in-place change at a named commit step ("written",
/// "refcounts", "header") until the process is killed: crash tests use it.
const STOP_AT: &str = "DISKKIT_STOP_AT";

/// Refuses anything but a qcow2 image for `what` (`forced`: the format the user named).
pub fn require_qcow2(path: &Path, forced: Option<Format>, what: &str) -> Result<()> {
    let format = match forced {
        Some(f) => f,
        None => detect(&HostFile::open(path)?)?,
    };
    if format != Format::Qcow2 {
        return Err(Error::unsupported(
            path,
            format!("{what} on a {format} image (only qcow2 has them)"),
        ));
    }
    install_stop_hook();
    Ok(())
}

fn install_stop_hook() {
    if std::env::var_os(STOP_AT).is_some() {
        edit::set_step_hook(|step| {
            if std::env::var(STOP_AT).as_deref() == Ok(step) {
                eprintln!("diskkit: stopped after step '{step}' ({STOP_AT})");
                loop {
                    std::thread::park();
                }
            }
        });
    }
}
