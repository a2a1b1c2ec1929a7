//! A pipeline's recently encoded prompts. The text encoders' output depends on nothing but
//! the prompt's token ids and the weights, and jobs repeat prompts: every guided job of a
//! studio brings its negative prompt (the same "" or "blurry, low quality" job after job),
//! and people re-roll a prompt with another seed. A prompt whose token ids one of the last
//! few jobs encoded takes that encoding from here, on the model's device, instead of
//! running the encoder(s) again: on the GPU that is each encoder's graph launch (or its few
//! hundred kernels), and where memory is tight enough that they run on the CPU it is the
//! CPU's whole pass (SDXL's two encoders, 0.8 G multiply-adds a token: 1.3 s on 2 cores).
//!
//! An entry is a prompt's conditioning, `(1, 77, C)` and SDXL's pooled `(1, 1280)`: 315 KB
//! in f16 at SDXL's width, so the whole cache holds at most a few MB of device memory. It
//! lives and goes with its pipeline.
//!
//! `STUDIO_WORKER_PROMPT_CACHE=0` keeps nothing: every job encodes its prompts, as a
//! reference pipeline does on every call (what the GPU bench's `generate --repeat` runs
//! compare with).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use candle_core::Tensor;

/// How many prompts a pipeline keeps encoded: a job's prompt and negative prompt, and a
/// few jobs' worth of re-rolls.
pub const CAPACITY: usize = 8;

/// The environment variable that turns the cache off (`0`, `off` or `false`).
pub const SWITCH: &str = "STUDIO_WORKER_PROMPT_CACHE";

/// One prompt's conditioning, on the model's device in its dtype.
#[derive(Clone, Debug)]
pub struct EncodedPrompt {
    /// The hidden states the UNet attends to, `(1, tokens, C)`.
    pub hidden_states: Tensor,
    /// SDXL's pooled text embedding, `(1, P)`.
    pub pooled: Option<Tensor>,
}

/// The last [`CAPACITY`] prompts encoded or used, least recently used first.
pub struct PromptCache {
    entries: Mutex<VecDeque<Entry>>,
    capacity: usize,
    /// How many prompts were encoded (not found here).
    encoded: AtomicU64,
}

struct Entry {
    /// Each tokenizer's ids for the prompt: what the encoding is a function of.
    token_ids: Vec<Vec<u32>>,
    prompt: EncodedPrompt,
}

impl Default for PromptCache {
    /// [`CAPACITY`] prompts, or none where [`SWITCH`] turns the cache off.
    fn default() -> Self {
        let off = crate::engine::kernels::switched_off(&std::env::var(SWITCH).unwrap_or_default());
        Self::with_capacity(if off { 0 } else { CAPACITY })
    }
}

impl PromptCache {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            encoded: AtomicU64::new(0),
        }
    }

    /// The encoding of the prompt with `token_ids` (one row per tokenizer): kept from an
    /// earlier job, else `encode`'s, then kept. An error is returned as it is, and nothing
    /// is kept. The lock is not held while encoding.
    pub fn get_or_encode<E>(
        &self,
        token_ids: Vec<Vec<u32>>,
        encode: impl FnOnce() -> Result<EncodedPrompt, E>,
    ) -> Result<EncodedPrompt, E> {
        {
            let mut entries = self.lock();
            if let Some(position) = entries
                .iter()
                .position(|entry| entry.token_ids == token_ids)
                && let Some(entry) = entries.remove(position)
            {
                let prompt = entry.prompt.clone();
                entries.push_back(entry);
                return Ok(prompt);
            }
        }
        let prompt = encode()?;
        self.encoded.fetch_add(1, Ordering::Relaxed);
        if self.capacity > 0 {
            let mut entries = self.lock();
            // Another caller may have encoded the same prompt meanwhile: one entry each.
            entries.retain(|entry| entry.token_ids != token_ids);
            while entries.len() >= self.capacity {
                entries.pop_front();
            }
            entries.push_back(Entry {
                token_ids,
                prompt: prompt.clone(),
            });
        }
        Ok(prompt)
    }

    /// How many prompts the text encoders ran for since the pipeline loaded.
    pub fn encoded(&self) -> u64 {
        self.encoded.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn tokens(prompt: &str) -> Vec<Vec<u32>> {
        vec![prompt.bytes().map(u32::from).collect()]
    }

    /// A stand-in encoder: the prompt's bytes as the hidden states.
    fn encoding(prompt: &str) -> Result<EncodedPrompt, String> {
        let values: Vec<f32> = prompt.bytes().map(f32::from).collect();
        let length = values.len();
        Ok(EncodedPrompt {
            hidden_states: Tensor::from_vec(values, (1, length), &Device::Cpu)
                .map_err(|error| error.to_string())?,
            pooled: None,
        })
    }

    fn values(prompt: &EncodedPrompt) -> Vec<f32> {
        prompt
            .hidden_states
            .flatten_all()
            .and_then(|flat| flat.to_vec1())
            .expect("readable")
    }

    /// Runs `prompts` through `cache`, counting the encoder's runs.
    fn run(cache: &PromptCache, prompts: &[&str]) -> (usize, Vec<Vec<f32>>) {
        let mut runs = 0;
        let outputs = prompts
            .iter()
            .map(|prompt| {
                let encoded = cache
                    .get_or_encode(tokens(prompt), || {
                        runs += 1;
                        encoding(prompt)
                    })
                    .expect("encodes");
                values(&encoded)
            })
            .collect();
        (runs, outputs)
    }

    #[test]
    fn a_repeated_prompt_is_encoded_once_and_each_prompt_gets_its_own_encoding() {
        let cache = PromptCache::default();
        let (runs, outputs) = run(&cache, &["", "a fox", "", "a cat", "a fox", ""]);
        assert_eq!(runs, 3);
        assert_eq!(cache.encoded(), 3);
        for (output, prompt) in outputs.iter().zip(["", "a fox", "", "a cat", "a fox", ""]) {
            assert_eq!(
                output,
                &values(&encoding(prompt).expect("encodes")),
                "{prompt:?}"
            );
        }
    }

    #[test]
    fn the_least_recently_used_prompt_goes_first() {
        let cache = PromptCache::with_capacity(2);
        // "a" is used again after "b", so "c" pushes "b" out, not "a".
        let (runs, _) = run(&cache, &["a", "b", "a", "c"]);
        assert_eq!(runs, 3);
        assert_eq!(run(&cache, &["a", "c"]).0, 0, "kept");
        assert_eq!(run(&cache, &["b"]).0, 1, "pushed out");
        assert!(cache.lock().len() <= 2);
    }

    #[test]
    fn prompts_are_told_apart_by_every_tokenizers_ids() {
        let cache = PromptCache::default();
        let first = vec![vec![1, 2], vec![3, 4]];
        let second = vec![vec![1, 2], vec![3, 5]];
        let mut runs = 0;
        for token_ids in [first.clone(), second, first] {
            cache
                .get_or_encode(token_ids, || {
                    runs += 1;
                    encoding("x")
                })
                .expect("encodes");
        }
        assert_eq!(runs, 2);
    }

    #[test]
    fn a_failed_encoding_is_reported_and_not_kept() {
        let cache = PromptCache::default();
        let failed = cache.get_or_encode(tokens("a"), || Err::<EncodedPrompt, _>("no memory"));
        assert_eq!(failed.err(), Some("no memory"));
        assert_eq!(run(&cache, &["a"]).0, 1, "encoded again after the failure");
        assert_eq!(cache.encoded(), 1);
    }

    #[test]
    fn a_cache_of_no_entries_encodes_every_time() {
        let cache = PromptCache::with_capacity(0);
        assert_eq!(run(&cache, &["a", "a"]).0, 2);
    }
}
