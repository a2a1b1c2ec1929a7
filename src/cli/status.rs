//! `studio-worker status`: the registration, the studio, the settings file and, when a worker
//! runs, what it last wrote to `status.json`. Read-only: it never moves or writes a file.

use std::path::PathBuf;

use serde::Serialize;

use super::running_status;
use crate::config::Paths;
use crate::registration::RegistrationState;
use crate::runtime::status_file;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusReport {
    registration: RegistrationState,
    description: String,
    worker_id: Option<String>,
    install_id: Option<String>,
    /// Masked (`abcd…wxyz`).
    auth_token: Option<String>,
    api_base_url: String,
    worker_name: String,
    config_path: PathBuf,
    /// Names in the settings file this version does not know (kept, not used).
    unknown_settings: Vec<String>,
    /// The pause the settings hold (the person's or the studio's); a running worker's own,
    /// policy included, is in `running.status.paused`.
    paused: Option<crate::vocab::pause::PauseReason>,
    /// What the running worker last wrote to `status.json`, when one is running.
    running: Option<status_file::StatusFile>,
}

pub(super) fn print_status(paths: &Paths, json: bool) -> anyhow::Result<()> {
    let config = super::read_settings(paths)?;
    let registration = RegistrationState::from_config(&config);
    let running = running_status(&paths.data_dir);
    let report = StatusReport {
        description: registration.describe(),
        registration,
        worker_id: config.worker_id.clone(),
        install_id: config.install_id.clone(),
        auth_token: config
            .auth_token
            .as_ref()
            .map(crate::secret::Secret::masked),
        api_base_url: config.api_base_url.clone(),
        worker_name: config.worker_name.clone(),
        config_path: paths.config_file.clone(),
        unknown_settings: config.unknown.names(),
        paused: crate::runtime::pause_reason(&config, &crate::policy::Decision::default()),
        running,
    };

    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let none = || "—".to_owned();
    println!("Registration: {}", report.description);
    println!(
        "Worker id:    {}",
        report.worker_id.clone().unwrap_or_else(none)
    );
    println!(
        "Token:        {}",
        report.auth_token.clone().unwrap_or_else(none)
    );
    println!(
        "Install id:   {}",
        report.install_id.clone().unwrap_or_else(none)
    );
    println!("Worker name:  {}", report.worker_name);
    println!("Studio:       {}", report.api_base_url);
    println!("Settings:     {}", report.config_path.display());
    if !report.unknown_settings.is_empty() {
        println!(
            "              not known to this version, so not used (misspelt?): {}",
            report.unknown_settings.join(", ")
        );
    }
    // A running worker knows more (a game, the schedule…) than the settings file.
    let paused = match &report.running {
        Some(file) => file.status.pause_line(),
        None => report
            .paused
            .map(|reason| crate::human::capitalise(reason.describe())),
    };
    println!(
        "Paused:       {}",
        paused.unwrap_or_else(|| "no".to_owned())
    );
    match &report.running {
        Some(file) => {
            let heartbeat = file.status.connection.last_heartbeat_at.map_or_else(
                || "no heartbeat yet".to_owned(),
                |at| {
                    format!(
                        "last heartbeat {}",
                        crate::human::ago(at, chrono::Utc::now())
                    )
                },
            );
            println!("Worker:       running (process {}), {heartbeat}", file.pid);
            if let Some(restarted) = &file.status.restarted {
                println!("GPU:          {}", restarted.describe(chrono::Utc::now()));
            }
            if let Some(notice) = &file.status.settings_recovered {
                println!("Settings:     {notice}");
            }
            if let Some(problem) = file
                .status
                .connection
                .last_error
                .as_ref()
                .or(file.status.registration_problem.as_ref())
            {
                println!("Problem:      {problem}");
            }
            if let Some(models) = file.status.models_summary() {
                println!("Models:       {models}");
            }
            for download in &file.status.downloads {
                println!("Download:     {}", download_line(download));
            }
        }
        None => println!("Worker:       not running"),
    }
    Ok(())
}

/// "sd-turbo: 1.29 GB of 2.58 GB, 18.2 MB/s, about 1 min left" (or why it stopped).
fn download_line(download: &crate::runtime::ModelDownload) -> String {
    let mut line = format!("{}: ", download.model_id);
    if download.total_bytes > 0 {
        line.push_str(&download.words().join(", "));
    } else {
        line.push_str("starting");
    }
    if let Some(problem) = &download.problem {
        line.push_str(&format!(" ({problem})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ModelDownload;

    #[test]
    fn a_download_reads_as_one_status_line() {
        let moving = ModelDownload {
            model_id: "sd-turbo".into(),
            done_bytes: 1_290_000_000,
            total_bytes: 2_580_000_000,
            bytes_per_second: 18_200_000.0,
            eta: Some(std::time::Duration::from_secs(71)),
            problem: None,
        };
        assert_eq!(
            download_line(&moving),
            "sd-turbo: 1.29 GB of 2.58 GB, 18.2 MB/s, about 1 min left"
        );
        let stuck = ModelDownload {
            model_id: "sdxl-turbo".into(),
            problem: Some("needs HF_TOKEN".into()),
            ..ModelDownload::default()
        };
        assert_eq!(
            download_line(&stuck),
            "sdxl-turbo: starting (needs HF_TOKEN)"
        );
    }
}
