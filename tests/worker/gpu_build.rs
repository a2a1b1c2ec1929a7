//! The CPU build's choice of the CUDA build shipped beside it (`platform::gpu_build`), with
//! the real binary: alone it reports the CPU; next to a CUDA build that cannot start (no
//! driver, or a CUDA library missing, simulated with programs gcc builds here) it still comes
//! up, on the CPU, and says why; next to one that opens a GPU it hands the process over.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::studio::{Decision, TestStudio};
use crate::support::{WorkerHome, eventually};

/// A copy of the real binary in a folder of its own, where a test puts a fake CUDA build.
struct Install {
    folder: tempfile::TempDir,
    home: WorkerHome,
}

impl Install {
    fn new() -> Self {
        let folder = tempfile::tempdir().expect("temp folder");
        std::fs::copy(
            env!("CARGO_BIN_EXE_studio-worker"),
            folder.path().join("studio-worker"),
        )
        .expect("copy the binary");
        Self {
            folder,
            home: WorkerHome::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.folder.path().join(name)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(self.path("studio-worker"));
        command
            .arg("--config")
            .arg(self.home.config_path())
            .env_remove("RUST_LOG")
            .env_remove("LD_LIBRARY_PATH")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HUB_CACHE", self.path("hf-cache"))
            .stdin(Stdio::null());
        command
    }

    /// A fake NVIDIA driver (`libcuda.so.1`) that speaks CUDA 13.0, for the commands given
    /// `LD_LIBRARY_PATH` to its folder.
    fn add_driver(&self) -> PathBuf {
        self.add_driver_speaking(13_000)
    }

    /// A fake NVIDIA driver whose `cuDriverGetVersion` says `cuda_version` (12040: 12.4).
    fn add_driver_speaking(&self, cuda_version: i32) -> PathBuf {
        let folder = self.path(&format!("driver-{cuda_version}"));
        std::fs::create_dir_all(&folder).expect("driver folder");
        compile(
            &format!(
                "int cuInit(unsigned int flags) {{ return flags ? 1 : 0; }}\n\
                 int cuDriverGetVersion(int *version) {{ *version = {cuda_version}; return 0; }}\n"
            ),
            &["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1"],
            &folder.join("libcuda.so.1"),
        );
        folder
    }

    /// A CUDA build whose `libcublas.so.13` is missing: the dynamic loader refuses it before
    /// `main`, exactly as the real one is refused on a PC without the CUDA libraries.
    fn add_cuda_build_missing_a_library(&self) {
        let stub = self.path("gone");
        std::fs::create_dir_all(&stub).expect("stub folder");
        compile(
            "int cublasCreate_v2(void *handle) { return handle != 0; }\n",
            &["-shared", "-fPIC", "-Wl,-soname,libcublas.so.13"],
            &stub.join("libcublas.so.13"),
        );
        compile_linked(
            "int cublasCreate_v2(void *handle);\nint main(void) { return cublasCreate_v2(0); }\n",
            &stub,
            &self.path("studio-worker-cuda"),
        );
        std::fs::remove_dir_all(&stub).expect("remove the library");
    }

    /// A CUDA build that reports a working GPU to the probe and records any other run.
    fn add_working_cuda_build(&self) {
        let marker = self.path("cuda-build-ran");
        let script = format!(
            "#!/bin/sh\n\
             if [ \"$*\" = \"device --json\" ]; then\n\
               echo '{{\"kind\":\"cuda\",\"name\":\"Fake RTX\",\"memoryMb\":12288,\"fallbackReason\":null}}'\n\
               exit 0\n\
             fi\n\
             echo \"$*\" > '{}'\n\
             echo \"the CUDA build ran: $*\"\n",
            marker.display()
        );
        let path = self.path("studio-worker-cuda");
        std::fs::write(&path, script).expect("write the fake build");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make it executable");
    }

    /// A CUDA build whose GPU does not open (too old for it, say): its probe falls back to the
    /// CPU with `reason`, as `auto` words it.
    fn add_cuda_build_falling_back(&self, reason: &str) {
        let script = format!(
            "#!/bin/sh\n\
             echo '{{\"kind\":\"cpu\",\"name\":\"CPU\",\"memoryMb\":8192,\"fallbackReason\":\"{reason}\"}}'\n"
        );
        let path = self.path("studio-worker-cuda");
        std::fs::write(&path, script).expect("write the fake build");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make it executable");
    }

    fn device_report(&self, driver: Option<&Path>) -> serde_json::Value {
        let mut command = self.command();
        command.args(["device", "--json"]);
        if let Some(driver) = driver {
            command.env("LD_LIBRARY_PATH", driver);
        }
        let out = run(&mut command);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("json: {}", text(&out)))
    }
}

fn run(command: &mut Command) -> Output {
    retry_while_text_busy(|| command.output())
}

/// Runs `start` again while the freshly copied binary is "text file busy": another test
/// thread's fork may still hold the copy's write handle for a moment before its exec closes
/// it (ETXTBSY).
fn retry_while_text_busy<T>(mut start: impl FnMut() -> std::io::Result<T>) -> T {
    const ETXTBSY: i32 = 26;
    for _ in 0..50 {
        match start() {
            Err(err) if err.raw_os_error() == Some(ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result.expect("start the copied binary"),
        }
    }
    panic!("the copied binary stayed busy for a second");
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn compile(source: &str, flags: &[&str], output: &Path) {
    let source_path = output.with_extension("c");
    std::fs::write(&source_path, source).expect("write C source");
    let status = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(output)
        .arg(&source_path)
        .status()
        .expect("a C compiler (gcc) is needed for this test");
    assert!(status.success(), "cc failed for {}", output.display());
}

fn compile_linked(source: &str, library_folder: &Path, output: &Path) {
    let source_path = output.with_extension("c");
    std::fs::write(&source_path, source).expect("write C source");
    let status = Command::new("cc")
        .arg("-o")
        .arg(output)
        .arg(&source_path)
        .arg("-L")
        .arg(library_folder)
        .arg("-l:libcublas.so.13")
        .status()
        .expect("a C compiler (gcc) is needed for this test");
    assert!(status.success(), "cc failed for {}", output.display());
}

#[test]
fn the_cpu_build_alone_reports_the_cpu() {
    let install = Install::new();
    let report = install.device_report(None);
    assert_eq!(report["kind"], "cpu");
    assert!(
        report["fallbackReason"]
            .as_str()
            .is_some_and(|reason| reason.contains("no GPU backend")),
        "{report}"
    );
}

#[test]
fn without_an_nvidia_driver_the_cuda_build_is_never_started() {
    let install = Install::new();
    install.add_working_cuda_build();
    let report = install.device_report(None);
    assert_eq!(report["kind"], "cpu");
    let reason = report["fallbackReason"].as_str().unwrap_or_default();
    assert!(reason.contains("no NVIDIA driver found"), "{reason}");
    assert!(reason.contains("libcuda.so.1"), "{reason}");
    assert!(!install.path("cuda-build-ran").exists());
}

#[test]
fn a_driver_too_old_for_the_cuda_build_is_named_with_the_version_to_update_to() {
    let install = Install::new();
    install.add_working_cuda_build();
    let driver = install.add_driver_speaking(12_040);
    let report = install.device_report(Some(&driver));
    assert_eq!(report["kind"], "cpu");
    let reason = report["fallbackReason"].as_str().unwrap_or_default();
    assert!(reason.contains("speaks CUDA 12.4"), "{reason}");
    assert!(
        reason.contains("update the NVIDIA driver to 580 or newer"),
        "{reason}"
    );
    assert!(!install.path("cuda-build-ran").exists(), "never started");
}

#[test]
fn a_gpu_too_old_for_the_cuda_build_is_named_once_and_the_cpu_used() {
    let install = Install::new();
    install.add_cuda_build_falling_back(
        "the CUDA GPU did not open: the NVIDIA GeForce GTX 1080 (Pascal: GeForce GTX 10 series, \
         compute capability 6.1) is older than the GPUs this build runs on (Turing: GeForce GTX \
         16 and RTX 20 series, compute capability 7.5 and newer); using the CPU",
    );
    let driver = install.add_driver();
    let report = install.device_report(Some(&driver));
    assert_eq!(report["kind"], "cpu");
    let reason = report["fallbackReason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("the CUDA build cannot run here: the CUDA GPU did not open: the NVIDIA GeForce GTX 1080 (Pascal"),
        "{reason}"
    );
    assert_eq!(reason.matches("using the CPU").count(), 1, "{reason}");
}

#[test]
fn a_cuda_build_that_opens_a_gpu_takes_over_the_process() {
    let install = Install::new();
    install.add_working_cuda_build();
    let driver = install.add_driver();
    let out = run(install
        .command()
        .arg("device")
        .env("LD_LIBRARY_PATH", &driver));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("the CUDA build ran:"),
        "the CUDA build answered: {}",
        text(&out)
    );
    let ran_with = std::fs::read_to_string(install.path("cuda-build-ran")).expect("marker");
    assert!(ran_with.contains("device"), "same arguments: {ran_with}");
    assert!(ran_with.contains("--config"), "same arguments: {ran_with}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cuda_libraries_absent_the_worker_still_comes_up_on_the_cpu() {
    let install = Install::new();
    install.add_cuda_build_missing_a_library();
    let driver = install.add_driver();

    // What `device` says: the loader's own words.
    let report = install.device_report(Some(&driver));
    assert_eq!(report["kind"], "cpu");
    let reason = report["fallbackReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the CUDA build cannot run here") && reason.contains("libcublas.so.13"),
        "{reason}"
    );

    // A real run: it registers, is approved, heartbeats, and reports the CPU with that reason.
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::ApproveAfterPolls(1));
    install.home.write_config(&studio.url());
    let mut worker = retry_while_text_busy(|| {
        install
            .command()
            .args(["run", "--headless"])
            .env("LD_LIBRARY_PATH", &driver)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    });
    let mut status = serde_json::Value::Null;
    eventually(
        "a heartbeat from the worker on the CPU",
        Duration::from_secs(30),
        || {
            let out = run(install.command().args(["status", "--json"]));
            status = serde_json::from_slice(&out.stdout).unwrap_or_default();
            !status["running"]["status"]["connection"]["lastHeartbeatAt"].is_null()
        },
    )
    .await;
    let _ = worker.kill();
    let _ = worker.wait();
    let running = &status["running"]["status"];
    assert_eq!(running["device"]["kind"], "cpu", "{running}");
    assert!(
        running["deviceNote"]
            .as_str()
            .is_some_and(|note| note.contains("libcublas.so.13")),
        "{running}"
    );
}
