//! Runs `tests/qmp/test_qmp.py`: ferry's QMP driven by `qemu.qmp`, QEMU's own Python
//! QMP library, and its `qmp-shell`, as management software written for QEMU would.
//!
//! Skips (saying so) when `python3` or the `qemu.qmp` package is missing; CI installs
//! it (`.ci/run`), and `python3 -m pip install 'qemu.qmp==0.0.6'` does locally.

use std::path::Path;
use std::process::Command;

fn python() -> Result<String, String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .map_err(|e| format!("no {python} ({e})"))?;
    if !probe.status.success() {
        return Err(format!(
            "{python} has no qemu.qmp package (python3 -m pip install 'qemu.qmp==0.0.6')"
        ));
    }
    Ok(python)
}

#[test]
fn qemu_qmp_drives_ferry() {
    let python = match python() {
        Ok(p) => p,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/qmp/test_qmp.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run the Python QMP test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n{text}",
        script.display(),
        out.status
    );
}
