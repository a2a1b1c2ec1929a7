//! With `--features cuda`: compiles each of our own kernel sources (`src/engine/kernels/*.cu`)
//! into a fatbin holding machine code (SASS) for every architecture in [`ARCHITECTURES`] plus
//! Turing PTX for anything newer, so the driver has nothing to compile for them at first
//! start. The binary embeds them (`include_bytes!`, one module per source, loaded and checked
//! on its own); `cuobjdump --list-elf` on `$OUT_DIR/<name>.fatbin` lists what is inside.
//! Without the feature there is nothing to do.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Compute capabilities to ship machine code for: Turing (RTX 20, GTX 16), A100, Ampere
/// (RTX 30), Ada (RTX 40), Hopper (H100/H200), Blackwell (RTX 50). CUDA 13 builds nothing
/// older than Turing.
const ARCHITECTURES: [u32; 6] = [75, 80, 86, 89, 90, 120];

/// The PTX kept beside the machine code, for architectures newer than the list.
const PTX_ARCHITECTURE: u32 = 75;

/// What the sources include.
const HEADERS: [&str; 3] = [
    "src/engine/kernels/conversions.cuh",
    "src/engine/kernels/columns.cuh",
    "src/engine/kernels/mma.cuh",
];

/// Each becomes `$OUT_DIR/<file stem>.fatbin`.
const SOURCES: [&str; 6] = [
    "src/engine/kernels/group_norm.cu",
    "src/engine/kernels/attention.cu",
    "src/engine/kernels/attention_mma.cu",
    "src/engine/kernels/geglu.cu",
    "src/engine/kernels/im2col.cu",
    "src/engine/kernels/conv3x3.cu",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for variable in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        println!("cargo::rerun-if-env-changed={variable}");
    }
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // The architecture candle's kernels are built for (its PTX runs there and newer only):
    // the engine refuses an older GPU with that in words rather than failing every job.
    if let Ok(cap) = env::var("CUDA_COMPUTE_CAP") {
        println!("cargo::rustc-env=STUDIO_WORKER_CANDLE_COMPUTE_CAP={cap}");
    }
    for source in SOURCES.iter().chain(HEADERS.iter()) {
        println!("cargo::rerun-if-changed={source}");
    }
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        fail("cargo did not set OUT_DIR");
    };
    let nvcc = nvcc();
    for source in SOURCES {
        let Some(stem) = Path::new(source).file_stem() else {
            fail(&format!("{source} has no file name"));
        };
        let fatbin = out_dir.join(stem).with_extension("fatbin");
        compile(&nvcc, source, &fatbin);
    }
}

/// `source` → `fatbin`: SASS for [`ARCHITECTURES`], PTX for [`PTX_ARCHITECTURE`].
fn compile(nvcc: &Path, source: &str, fatbin: &Path) {
    let mut command = Command::new(nvcc);
    command
        .arg("--fatbin")
        .args(["-O3", "-std=c++17"])
        .arg("-o")
        .arg(fatbin);
    for architecture in ARCHITECTURES {
        command.arg(format!(
            "-gencode=arch=compute_{architecture},code=sm_{architecture}"
        ));
    }
    command.arg(format!(
        "-gencode=arch=compute_{PTX_ARCHITECTURE},code=compute_{PTX_ARCHITECTURE}"
    ));
    command.arg(source);
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!("{} failed on {source} ({status})", nvcc.display())),
        Err(error) => fail(&format!(
            "cannot run {} ({error}); install the CUDA toolkit or set NVCC",
            nvcc.display()
        )),
    }
}

/// `$NVCC`, else `bin/nvcc` under the toolkit's root, else `nvcc` from `PATH`.
fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    let name = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(env::var_os)
        .map(|root| Path::new(&root).join("bin").join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn fail(message: &str) -> ! {
    eprintln!("error: building the CUDA kernels: {message}");
    std::process::exit(1);
}
