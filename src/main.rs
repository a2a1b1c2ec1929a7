//! The `studio-worker` binary: everything lives in the library, see `cli::main`.

fn main() -> std::process::ExitCode {
    studio_worker::cli::main()
}
