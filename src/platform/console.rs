//! The console a Windows release build writes to. The release is a windowed program
//! (`windows_subsystem = "windows"` in `main.rs`), so no console window opens beside the app
//! when it starts from the Start menu, the installer or at login; the text of its commands
//! (`device`, `status`, `generate`, `--help`, an error) then reaches a terminal only once the
//! process attaches to the console of the terminal that started it. Elsewhere, and in debug
//! builds (console programs), there is nothing to do.

/// Attaches this process to the console of the process that started it, where there is one
/// and the output is not redirected already (a pipe, as the GPU probe's, or a file: kept as
/// they are). Call it first thing, before anything is printed. Where no parent has a console
/// (started from Explorer) nothing is attached and output goes nowhere, as a windowed
/// program's does; the log file keeps what matters.
pub fn attach_to_parent() {
    #[cfg(all(windows, not(debug_assertions)))]
    {
        use windows_sys::Win32::Foundation::{HANDLE, INVALID_HANDLE_VALUE};
        use windows_sys::Win32::System::Console::{
            ATTACH_PARENT_PROCESS, AttachConsole, GetStdHandle, STD_ERROR_HANDLE, STD_OUTPUT_HANDLE,
        };
        let missing = |handle: HANDLE| handle.is_null() || handle == INVALID_HANDLE_VALUE;
        // SAFETY: Win32 calls with constant arguments; no memory is handed over.
        unsafe {
            if missing(GetStdHandle(STD_OUTPUT_HANDLE)) && missing(GetStdHandle(STD_ERROR_HANDLE)) {
                // Its failure means there is no parent console: nothing to write to.
                AttachConsole(ATTACH_PARENT_PROCESS);
            }
        }
    }
}
