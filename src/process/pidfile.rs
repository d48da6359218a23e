//! The pid file: who owns it, whether it is stale, writing and removing it.
//!
//! A pid file is "live" only when its pid names a running process whose
//! executable is this program; anything else (no such process, a zombie, a
//! reused pid running something else, garbage) is stale and is reported and
//! replaced, never signalled.

use std::io;
use std::path::{Path, PathBuf};

/// What a pid file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidState {
    /// No pid file.
    Absent,
    /// A live master of this program.
    Running(i32),
    /// A pid file whose process is gone or is not ours.
    Stale {
        /// The pid it named (0 if unreadable).
        pid: i32,
        /// Why it is stale.
        why: String,
    },
}

/// Reads and classifies the pid file at `path`.
pub fn inspect(path: &Path) -> PidState {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return PidState::Absent,
        Err(e) => {
            return PidState::Stale {
                pid: 0,
                why: format!("unreadable: {e}"),
            }
        }
    };
    let pid = match text.trim().parse::<i32>() {
        Ok(p) if p > 1 => p,
        _ => {
            return PidState::Stale {
                pid: 0,
                why: format!("does not hold a pid: {:?}", text.trim()),
            }
        }
    };
    match process_state(pid) {
        None => PidState::Stale {
            pid,
            why: format!("no process {pid}"),
        },
        Some('Z') | Some('X') => PidState::Stale {
            pid,
            why: format!("process {pid} is a zombie"),
        },
        Some(_) if !is_ours(pid) => PidState::Stale {
            pid,
            why: format!("process {pid} is not {}", program_name()),
        },
        Some(_) => PidState::Running(pid),
    }
}

/// The one-letter state of a process from /proc/PID/stat, if it exists.
pub fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rfind(')')?;
    stat[after + 1..].trim_start().chars().next()
}

/// Whether `pid` runs (is alive and not a zombie).
pub fn alive(pid: i32) -> bool {
    !matches!(process_state(pid), None | Some('Z') | Some('X'))
}

fn program_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// Whether `pid` runs this program's executable.
fn is_ours(pid: i32) -> bool {
    let exe: Option<PathBuf> = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let name = exe.as_ref().and_then(|p| p.file_name()).map(|n| {
        n.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string()
    });
    name.is_some_and(|n| n == program_name())
}

/// Writes `pid` atomically (temp file + rename).
pub fn write(path: &Path, pid: i32) -> io::Result<()> {
    let tmp = path.with_extension(format!("pid.{pid}.tmp"));
    std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io::Error::new(
                e.kind(),
                format!("cannot write pid file {}: {e}", path.display()),
            )
        })
}

/// Removes the pid file if it still names `pid`.
pub fn remove_if_ours(path: &Path, pid: i32) {
    if std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        == Some(pid)
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Checks that the pid file's directory is writable, before anything starts.
pub fn check_writable(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).map_err(|e| {
        io::Error::other(format!(
            "pid file directory {} is not writable: {e}",
            dir.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_pid_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pid");
        assert_eq!(inspect(&p), PidState::Absent);
        std::fs::write(&p, "garbage").unwrap();
        assert!(matches!(inspect(&p), PidState::Stale { pid: 0, .. }));
        std::fs::write(&p, "1\n").unwrap();
        assert!(
            matches!(inspect(&p), PidState::Stale { .. }),
            "pid 1 is not this program"
        );
        write(&p, std::process::id() as i32).unwrap();
        assert_eq!(inspect(&p), PidState::Running(std::process::id() as i32));
        remove_if_ours(&p, 42);
        assert!(p.exists());
        remove_if_ours(&p, std::process::id() as i32);
        assert!(!p.exists());
    }
}
