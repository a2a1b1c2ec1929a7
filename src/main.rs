//! The `studio-worker` binary: everything lives in the library, see `cli::main`.

// On Windows the release is a windowed program: no console window opens beside the app (from
// the Start menu, the installer, at login). Its commands still write to the terminal that
// started them (`platform::console`). Debug builds stay console programs.
#![cfg_attr(all(windows, not(debug_assertions)), windows_subsystem = "windows")]

fn main() -> std::process::ExitCode {
    studio_worker::cli::main()
}
