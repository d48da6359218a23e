//! The settings loader (`config::load`) on arbitrary TOML text, with the
//! Route's and the IM server's keys: never panics; errors name a key or
//! the file.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use swocloud::config::load;

fuzz_target!(|data: &[u8]| {
    let Ok(mut f) = tempfile::NamedTempFile::new_in(dir()) else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    let path = f.path();
    let r = load::<swocloud::route::settings::RouteSettings>(
        swocloud::route::settings::framework_defaults(),
        Some(path),
        &[],
    );
    if let Err(e) = r {
        assert!(!e.to_string().is_empty());
    }
    let _ = load::<swocloud::im::settings::ImSettings>(
        swocloud::im::settings::framework_defaults(),
        Some(path),
        &[],
    );
});

/// A RAM-backed directory when there is one (the loader reads a file).
fn dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
