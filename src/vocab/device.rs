//! The device the engine runs on: what the person asks for ([`DevicePreference`]) and what it
//! is ([`DeviceInfo`], the protocol's `device`, §4).

use serde::{Deserialize, Serialize};

/// `[engine] device`: which device the engine should use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DevicePreference {
    /// The GPU when this build has its backend and it opens, else the CPU.
    #[default]
    Auto,
    Cuda,
    Metal,
    Cpu,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    pub kind: DeviceKind,
    pub name: String,
    pub memory_mb: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cuda,
    Metal,
    Cpu,
}

impl DeviceKind {
    /// The backend's name as the window and `device` show it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Cuda => "CUDA",
            Self::Metal => "Metal",
            Self::Cpu => "CPU",
        }
    }
}
