//! Which programs run: the whole process list for the person's "always pause for" list
//! (walked only when that list is not empty, and at most every few seconds: the policy task
//! decides how often), and one process's name for the other probes.

use super::{Probed, ProgramProbe, Unavailable};

pub(super) struct RunningPrograms {
    system: Option<sysinfo::System>,
}

impl RunningPrograms {
    pub(super) fn new() -> Self {
        Self {
            system: sysinfo::System::new().ok(),
        }
    }
}

impl ProgramProbe for RunningPrograms {
    fn running(&mut self) -> Probed<Vec<String>> {
        let system = self
            .system
            .as_mut()
            .ok_or_else(|| Unavailable("this OS does not list its processes".to_owned()))?;
        system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::All,
            true,
            sysinfo::ProcessRefreshKind::nothing(),
        );
        let mut names: Vec<String> = system
            .processes()
            .values()
            .map(|process| process.name().to_string_lossy().to_lowercase())
            .collect();
        names.sort_unstable();
        names.dedup();
        Ok(names)
    }
}

/// The name of process `pid`'s program, if it runs.
pub(super) fn name_of(pid: u32) -> Option<String> {
    let mut system = sysinfo::System::new().ok()?;
    let pid = sysinfo::Pid::from_u32(pid);
    system.refresh_processes_specifics(
        sysinfo::ProcessesToUpdate::Some(&[pid]),
        true,
        sysinfo::ProcessRefreshKind::nothing(),
    );
    system
        .process(pid)
        .map(|process| process.name().to_string_lossy().into_owned())
}
