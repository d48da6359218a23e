//! Leveled logging for every process: one line per record with UTC time,
//! level, role and pid, to stderr in the foreground or to `log_file`.
//!
//! A small `log::Log` of our own rather than simplelog: every line must name
//! the process role (master, manager, worker#N), which simplelog's formats
//! cannot carry, and the file must be reopened in place on SIGHUP for
//! logrotate, which simplelog's `WriteLogger` (it owns its writer) cannot do.
//! Lines are written with one `write(2)` on an `O_APPEND` file, so lines of
//! different processes never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

struct State {
    role: String,
    file: Option<(PathBuf, File)>,
    /// Also point stdout/stderr at the file (daemon mode), so panics and
    /// stray prints land in the log too.
    capture_stdio: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    role: String::new(),
    file: None,
    capture_stdio: false,
});

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let st = STATE.lock().unwrap_or_else(|p| p.into_inner());
        let line = format!(
            "{} {:<5} [{} {}] {}\n",
            utc_timestamp(),
            r.level(),
            if st.role.is_empty() { "main" } else { &st.role },
            std::process::id(),
            r.args()
        );
        match &st.file {
            Some((_, f)) => {
                let _ = (&*f).write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (once per process tree) at `level`, writing to
/// `file` when given, else stderr.
pub fn init(
    level: log::LevelFilter,
    file: Option<&Path>,
    capture_stdio: bool,
) -> std::io::Result<()> {
    let _ = log::set_logger(&Logger);
    log::set_max_level(level);
    let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
    st.capture_stdio = capture_stdio;
    st.file = match file {
        Some(p) => Some((p.to_path_buf(), open(p)?)),
        None => None,
    };
    if capture_stdio {
        if let Some((_, f)) = &st.file {
            redirect_stdio(f);
        }
    }
    Ok(())
}

/// Opens a log file for appending, with an error that names it.
pub fn open(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open log file {}: {e}", p.display()),
            )
        })
}

fn redirect_stdio(f: &File) {
    // SAFETY: dup2 onto the standard descriptors with a valid open fd; no
    // Rust object owns fds 1 and 2 exclusively.
    unsafe {
        libc::dup2(f.as_raw_fd(), 1);
        libc::dup2(f.as_raw_fd(), 2);
    }
}

/// Sets the role shown on every line of this process (after fork).
pub fn set_role(role: impl Into<String>) {
    STATE.lock().unwrap_or_else(|p| p.into_inner()).role = role.into();
}

/// Reopens the log file by path (logrotate moved it away).
pub fn reopen() {
    let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let capture = st.capture_stdio;
    if let Some((path, file)) = &mut st.file {
        match open(path) {
            Ok(f) => {
                *file = f;
                if capture {
                    redirect_stdio(file);
                }
            }
            Err(e) => {
                let _ = (&*file).write_all(
                    format!(
                        "{} ERROR [reopen {}] {e}\n",
                        utc_timestamp(),
                        std::process::id()
                    )
                    .as_bytes(),
                );
            }
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for now.
pub fn utc_timestamp() -> String {
    let ms = crate::process::scoreboard::now_ms();
    let (secs, millis) = ((ms / 1000) as i64, ms % 1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_781), (2026, 11, 24));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
