//! The models this worker knows how to fetch: where each lives on the Hugging Face hub,
//! which of its files the engine needs, about how big they are, and the settings a job gets
//! when it names none.

use crate::vocab::job::Scheduler;

/// One model of the catalog.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CatalogEntry {
    /// The id jobs and settings use (`sd-turbo`).
    pub id: &'static str,
    pub display_name: &'static str,
    /// `owner/name` on the hub.
    pub repo: &'static str,
    /// The commit fetched: pinned, never a branch, so what a worker downloads is what was
    /// reviewed here (and a repository that changes under its name changes nothing). Moving
    /// to a newer commit is a change to this file.
    pub revision: &'static str,
    /// Prefer `*.fp16.safetensors` weights (half the download; GPUs run f16 anyway).
    pub prefer_fp16: bool,
    /// About how much the download is, for `models list` before the hub is asked.
    pub download_bytes: u64,
    /// The least GPU memory it runs in, f16, at its native size, in MiB. Measured by
    /// `benches/gpu` on an H200 (2026-11-28, process peaks with the context): SD-Turbo
    /// 3953 MiB and SD 1.5 3505 MiB at 512², SDXL base 8656 MiB at 1024² with 12 GB free (the
    /// engine tiles to fit). SDXL-Turbo and SD 2.1 are estimated from those; the GPU bench's
    /// next run measures them ("The catalog's rows no case above measures").
    pub min_gpu_mb: u64,
    pub defaults: JobDefaults,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobDefaults {
    pub size: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub scheduler: Scheduler,
}

const GB: u64 = 1_000_000_000;
const MB: u64 = 1_000_000;

pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        id: "sd-turbo",
        display_name: "SD-Turbo",
        repo: "stabilityai/sd-turbo",
        revision: "b261bac6fd2cf515557d5d0707481eafa0485ec2",
        prefer_fp16: true,
        download_bytes: 2 * GB + 590 * MB,
        min_gpu_mb: 4096,
        defaults: JobDefaults {
            size: 512,
            steps: 1,
            guidance_scale: 0.0,
            scheduler: Scheduler::EulerA,
        },
    },
    CatalogEntry {
        id: "sdxl-turbo",
        display_name: "SDXL-Turbo",
        repo: "stabilityai/sdxl-turbo",
        revision: "71153311d3dbb46851df1931d3ca6e939de83304",
        prefer_fp16: true,
        download_bytes: 6 * GB + 940 * MB,
        min_gpu_mb: 8192,
        defaults: JobDefaults {
            size: 512,
            steps: 1,
            guidance_scale: 0.0,
            scheduler: Scheduler::EulerA,
        },
    },
    CatalogEntry {
        id: "sd-1.5",
        display_name: "Stable Diffusion 1.5",
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
        prefer_fp16: true,
        download_bytes: 2 * GB + 130 * MB,
        min_gpu_mb: 4096,
        defaults: JobDefaults {
            size: 512,
            steps: 25,
            guidance_scale: 7.5,
            scheduler: Scheduler::DpmPp2mKarras,
        },
    },
    CatalogEntry {
        id: "sd-2.1",
        display_name: "Stable Diffusion 2.1",
        repo: "stabilityai/stable-diffusion-2-1",
        revision: "5cae40e6a2745ae2b01ad92ae5043f95f23644d6",
        prefer_fp16: true,
        download_bytes: 2 * GB + 590 * MB,
        min_gpu_mb: 6144,
        defaults: JobDefaults {
            size: 768,
            steps: 25,
            guidance_scale: 7.5,
            scheduler: Scheduler::DpmPp2mKarras,
        },
    },
    CatalogEntry {
        id: "sdxl-base-1.0",
        display_name: "SDXL 1.0 (base)",
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        revision: "462165984030d82259a11f4367a4eed129e94a7b",
        prefer_fp16: true,
        download_bytes: 6 * GB + 940 * MB,
        min_gpu_mb: 10240,
        defaults: JobDefaults {
            size: 1024,
            steps: 30,
            guidance_scale: 7.0,
            scheduler: Scheduler::DpmPp2mKarras,
        },
    },
];

/// The catalog entry with this id.
pub fn find(model_id: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|entry| entry.id == model_id)
}

/// Components whose weights the pipeline loads, and the weight file's stem in each.
const WEIGHTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("text_encoder_2", "model"),
];

/// Small files the loader reads.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Which of a repository's files a diffusers pipeline needs: the configs, the tokenizers,
/// and one safetensors file per component (the fp16 variant when preferred and present).
/// Everything else (`.bin` and `.ckpt` duplicates, safety checker, samples) is left out.
pub fn needed_files(repo_files: &[&str], prefer_fp16: bool) -> Vec<String> {
    let has = |path: &str| repo_files.contains(&path);
    let mut needed: Vec<String> = Vec::new();
    for &path in repo_files {
        let mut parts = path.split('/');
        let (first, second, rest) = (parts.next(), parts.next(), parts.next());
        let wanted = match (first, second, rest) {
            (Some("model_index.json"), None, None) => true,
            (Some("scheduler"), Some("scheduler_config.json"), None) => true,
            (Some(component), Some("config.json"), None) => {
                WEIGHTS.iter().any(|(name, _)| *name == component)
            }
            (Some(component), Some(file), None) if component.starts_with("tokenizer") => {
                TOKENIZER_FILES.contains(&file)
            }
            _ => false,
        };
        if wanted {
            needed.push(path.to_owned());
        }
    }
    for (component, stem) in WEIGHTS {
        if !has(&format!("{component}/config.json")) {
            continue;
        }
        let full = format!("{component}/{stem}.safetensors");
        let half = format!("{component}/{stem}.fp16.safetensors");
        let pick = match (prefer_fp16 && has(&half), has(&full), has(&half)) {
            (true, _, _) | (false, false, true) => Some(half),
            (false, true, _) => Some(full),
            (false, false, false) => None,
        };
        needed.extend(pick);
    }
    needed.sort();
    needed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_pins_a_commit() {
        for entry in CATALOG {
            assert!(
                entry.revision.len() == 40
                    && entry
                        .revision
                        .chars()
                        .all(|c| matches!(c, '0'..='9' | 'a'..='f')),
                "{} fetches {:?}, not a commit",
                entry.id,
                entry.revision
            );
        }
    }

    #[test]
    fn ids_are_unique_and_findable() {
        for entry in CATALOG {
            assert_eq!(find(entry.id), Some(entry));
            assert!(entry.repo.contains('/'));
        }
        assert_eq!(find("sd-9"), None);
    }

    #[test]
    fn a_pipeline_needs_its_configs_tokenizers_and_one_weight_file_per_component() {
        let repo = [
            ".gitattributes",
            "README.md",
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/pytorch_model.bin",
            "tokenizer/merges.txt",
            "tokenizer/vocab.json",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "safety_checker/config.json",
            "safety_checker/model.safetensors",
            "v1-5-pruned.ckpt",
        ];
        let fp16 = needed_files(&repo, true);
        assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_owned()));
        assert!(fp16.contains(&"text_encoder/model.fp16.safetensors".to_owned()));
        // No fp16 VAE in this repo: the full one.
        assert!(fp16.contains(&"vae/diffusion_pytorch_model.safetensors".to_owned()));
        assert!(fp16.contains(&"tokenizer/vocab.json".to_owned()));
        assert!(!fp16.iter().any(|path| path.contains("safety_checker")));
        assert!(
            !fp16
                .iter()
                .any(|path| path.ends_with(".bin") || path.ends_with(".ckpt"))
        );
        assert_eq!(
            fp16.iter()
                .filter(|path| path.ends_with(".safetensors"))
                .count(),
            3
        );

        let full = needed_files(&repo, false);
        assert!(full.contains(&"unet/diffusion_pytorch_model.safetensors".to_owned()));
        assert!(!full.iter().any(|path| path.contains(".fp16.")));
    }
}
