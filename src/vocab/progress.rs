//! Where a running job is: its [`Stage`] (the protocol's `stage`, §3.2) and step.

use serde::{Deserialize, Serialize};

/// Where a job is (§3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    LoadingModel,
    Encoding,
    Denoising,
    Decoding,
    Uploading,
}

impl Stage {
    pub fn describe(self) -> &'static str {
        match self {
            Self::LoadingModel => "loading the model",
            Self::Encoding => "reading the prompt",
            Self::Denoising => "drawing",
            Self::Decoding => "finishing the image",
            Self::Uploading => "uploading",
        }
    }
}

/// What a running job reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobProgress {
    pub stage: Stage,
    pub step: u32,
    pub total_steps: u32,
}
