//! Choosing between the two builds an installer ships: `studio-worker` (CPU only, starts
//! anywhere) and, beside it, `studio-worker-cuda` (the same program built with
//! `--features cuda`).
//!
//! candle links the CUDA libraries at load time (`libcuda`, `libcublas`, `libcurand`), so the
//! CUDA build cannot even start on a PC without them: the dynamic loader refuses it before
//! `main`. The CPU build therefore starts first and hands over only when the CUDA build can
//! run here:
//!
//! 1. no `studio-worker-cuda` beside this program (or in `../lib/studio-worker/`) → stay
//!    (a plain CPU or Metal build);
//! 2. the NVIDIA driver's library does not load, or the driver is older than the CUDA the
//!    build was made with (its kernels are PTX, which only a driver at least that new can
//!    compile) → stay, with that reason and the driver version to update to;
//! 3. `studio-worker-cuda device --json` (a probe process) fails to start or finds no usable
//!    GPU → stay, with the loader's or the probe's first line as the reason;
//! 4. otherwise replace this process with the CUDA build (same arguments, same environment).
//!
//! The reason for staying is recorded ([`unavailable_note`]) so the log, `device` and the
//! Status tab say why the CPU is used.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// File name of the CUDA build, next to the CPU build.
pub const CUDA_BUILD_NAME: &str = if cfg!(windows) {
    "studio-worker-cuda.exe"
} else {
    "studio-worker-cuda"
};

/// The NVIDIA driver's user-space library, present exactly when a driver is installed.
const DRIVER_LIBRARY: &str = if cfg!(windows) {
    "nvcuda.dll"
} else {
    "libcuda.so.1"
};

/// The CUDA version the release's CUDA build is made with (`.github/workflows/release.yml`),
/// as `cuDriverGetVersion` counts it (1000 × major + 10 × minor), and the first NVIDIA
/// driver release that speaks it. CUDA 13.0: drivers 580 and newer, Turing (sm_75) and newer.
const BUILT_WITH_CUDA: i32 = 13_000;
const DRIVER_FLOOR: &str = "580";

/// How long the probe may take to open the GPU before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the CUDA build shipped beside this one is not running; set once, at start.
static UNAVAILABLE_NOTE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Why this process runs without the CUDA build next to it (for `auto`'s fallback reason in
/// the log, `device` and the Status tab), when it was there and could not run.
pub fn unavailable_note() -> Option<&'static str> {
    UNAVAILABLE_NOTE.get().map(String::as_str)
}

fn note_unavailable(reason: String) {
    let _ = UNAVAILABLE_NOTE.set(reason);
}

/// What the CPU build decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// No CUDA build beside this one: nothing to choose.
    NoGpuBuild,
    /// A CUDA build is there but cannot run on this PC, and why.
    StayOnCpu(String),
    /// The CUDA build opened a GPU: run it instead.
    HandOver(PathBuf),
}

/// Where an installer puts the CUDA build: beside this program (Windows, a portable
/// folder), or in the package's library folder (Linux: `/usr/lib/studio-worker/`, next to
/// the CUDA libraries it brings).
pub fn candidates(exe: &Path) -> Vec<PathBuf> {
    let mut places = vec![exe.with_file_name(CUDA_BUILD_NAME)];
    if let Some(prefix) = exe.parent().and_then(Path::parent) {
        places.push(prefix.join("lib/studio-worker").join(CUDA_BUILD_NAME));
    }
    places
}

/// Decides for the program at `exe` (this process's own path in production).
pub fn decide(exe: &Path) -> Decision {
    let Some(gpu_build) = candidates(exe).into_iter().find(|path| path.is_file()) else {
        return Decision::NoGpuBuild;
    };
    if let Err(reason) = driver_loads() {
        return Decision::StayOnCpu(reason);
    }
    match probe(&gpu_build) {
        Ok(()) => Decision::HandOver(gpu_build),
        Err(reason) => Decision::StayOnCpu(reason),
    }
}

/// Runs the CUDA build in this process's place when it can run here; returns (with the
/// reason recorded) when this build should go on. Only meaningful in a build without CUDA.
pub fn hand_over_if_usable() {
    if cfg!(feature = "cuda") {
        return;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            note_unavailable(format!("cannot find this program's own path ({err})"));
            return;
        }
    };
    match decide(&exe) {
        Decision::NoGpuBuild => {}
        Decision::StayOnCpu(reason) => note_unavailable(reason),
        Decision::HandOver(gpu_build) => {
            let args: Vec<OsString> = std::env::args_os().skip(1).collect();
            let reason = replace_process(&gpu_build, &args);
            note_unavailable(reason);
        }
    }
}

fn driver_loads() -> Result<(), String> {
    // SAFETY: loading the NVIDIA driver library runs its initialisers, which is what the
    // CUDA build would do at start anyway.
    let library = match unsafe { libloading::Library::new(DRIVER_LIBRARY) } {
        Ok(library) => library,
        Err(err) => {
            return Err(format!(
                "no NVIDIA driver found ({DRIVER_LIBRARY} does not load: {})",
                first_line(&err.to_string())
            ));
        }
    };
    match driver_cuda_version(&library) {
        Some(version) if version < BUILT_WITH_CUDA => Err(format!(
            "the NVIDIA driver is too old for the GPU build (it speaks CUDA {}.{}, the build \
             needs {}.{}): update the NVIDIA driver to {DRIVER_FLOOR} or newer",
            version / 1000,
            version % 1000 / 10,
            BUILT_WITH_CUDA / 1000,
            BUILT_WITH_CUDA % 1000 / 10,
        )),
        // Newer, or a driver that does not say: the probe finds out.
        _ => Ok(()),
    }
}

/// The CUDA version the loaded driver speaks (`cuDriverGetVersion`, which needs no
/// `cuInit`), or `None` when it does not say.
fn driver_cuda_version(library: &libloading::Library) -> Option<i32> {
    type DriverGetVersion = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: `cuDriverGetVersion(int *driverVersion)` is the CUDA driver API's signature
    // since CUDA 2.2; it writes one int and returns a status.
    let get_version = unsafe { library.get::<DriverGetVersion>(b"cuDriverGetVersion\0") }.ok()?;
    let mut version = 0_i32;
    // SAFETY: `version` outlives the call, and the function only writes through it.
    let status = unsafe { get_version(&mut version) };
    (status == 0 && version > 0).then_some(version)
}

/// Starts `gpu_build device --json` and waits for it to say it opened a CUDA GPU.
fn probe(gpu_build: &Path) -> Result<(), String> {
    let mut child = Command::new(gpu_build)
        .args(["device", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("the CUDA build did not start: {err}"))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < PROBE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the CUDA build did not open the GPU within {} s",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            Err(err) => return Err(format!("the CUDA build did not finish: {err}")),
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|err| format!("the CUDA build's answer was unreadable: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
    if output.status.success() && report["kind"] == "cuda" {
        return Ok(());
    }
    // The loader's own words ("error while loading shared libraries: libcublas.so.13: cannot
    // open shared object file"), or the probe's fallback reason.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let said = report["fallbackReason"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            stderr
                .lines()
                .find(|line| !line.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("it exited with {}", output.status));
    // Its `auto` fell back to the CPU and said so; this build says it once, for itself.
    let said = first_line(&said);
    let said = said.strip_suffix("; using the CPU").unwrap_or(said);
    Err(format!("the CUDA build cannot run here: {said}"))
}

/// Replaces this process with `program` (Unix `exec`); on Windows runs it and exits with its
/// code. Returns only when that failed, with the reason.
fn replace_process(program: &Path, args: &[OsString]) -> String {
    tracing::debug!("handing over to {}", program.display());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let err = Command::new(program).args(args).exec();
        format!("the CUDA build did not start: {err}")
    }
    #[cfg(not(unix))]
    {
        match Command::new(program).args(args).status() {
            Ok(status) => std::process::exit(status.code().unwrap_or(1)),
            Err(err) => format!("the CUDA build did not start: {err}"),
        }
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cuda_build_is_looked_for_beside_and_in_the_packages_library_folder() {
        assert_eq!(
            candidates(Path::new("/usr/bin/studio-worker")),
            [
                PathBuf::from("/usr/bin").join(CUDA_BUILD_NAME),
                PathBuf::from("/usr/lib/studio-worker").join(CUDA_BUILD_NAME),
            ]
        );
    }

    #[test]
    fn without_a_cuda_build_beside_it_nothing_is_chosen() {
        let folder = tempfile::tempdir().unwrap();
        assert_eq!(
            decide(&folder.path().join("studio-worker")),
            Decision::NoGpuBuild
        );
    }
}
