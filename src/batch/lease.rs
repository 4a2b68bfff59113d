//! Who holds an item: a worker's identity (host, process id, process start) and its lease.
//!
//! A claim expires when its worker stops renewing it (the worker died, or its machine did). On
//! the same host a rerun need not wait for that: the process named in the claim is gone (or its
//! id now belongs to a process started at another time), so the claim is taken over at once.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// One worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerId {
    pub host: String,
    pub pid: u32,
    /// When the process started, in clock ticks since boot (`/proc/PID/stat`): tells a process
    /// from a later one that got the same id (containers restart as PID 1).
    pub start: u64,
}

impl WorkerId {
    /// This process.
    pub fn current() -> WorkerId {
        let pid = std::process::id();
        WorkerId {
            host: hostname(),
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    }

    /// A name for object keys and logs: `HOST-PID-START` with only `[A-Za-z0-9._-]`.
    pub fn name(&self) -> String {
        let host: String = self
            .host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        format!("{host}-{}-{}", self.pid, self.start)
    }

    /// True when `self` names a process of `me`'s host that no longer runs (its id is free or
    /// belongs to a process started at another time). `me` itself is alive.
    pub fn is_dead_process_of(&self, me: &WorkerId) -> bool {
        if self.host != me.host || self == me {
            return false;
        }
        if self.pid == me.pid {
            return true;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        if !crate::output::process_alive(pid) {
            return true;
        }
        process_start(self.pid).is_some_and(|start| start != self.start)
    }
}

/// `STATE/claims/ITEM/GENERATION`: who works on an item, until when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claim {
    pub worker: WorkerId,
    /// Seconds since 1970 after which the claim may be taken over.
    pub expires: f64,
    /// The item's line in the job file, for status.
    pub line: usize,
}

/// Seconds since 1970, with fractions.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Field 22 of `/proc/PID/stat` (the start time), after the command name that may hold spaces
/// and parentheses.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_processes_of_this_host_are_recognised() {
        let me = WorkerId::current();
        assert!(me.start > 0);
        assert!(!me.is_dead_process_of(&me));
        let mut earlier = me.clone();
        earlier.start -= 1;
        assert!(earlier.is_dead_process_of(&me), "same pid, other start");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = WorkerId { pid, ..me.clone() };
        assert!(gone.is_dead_process_of(&me));
        let parent = WorkerId {
            pid: std::os::unix::process::parent_id(),
            start: process_start(std::os::unix::process::parent_id()).unwrap(),
            ..me.clone()
        };
        assert!(!parent.is_dead_process_of(&me));
        let elsewhere = WorkerId {
            host: format!("{}-other", me.host),
            ..gone
        };
        assert!(!elsewhere.is_dead_process_of(&me));
        assert!(!me.name().contains('/'));
    }
}
