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

    /// The encodings of `prompts` (each its token ids, one row per tokenizer), in their
    /// order: those kept from an earlier job, the rest from one call of `encode` for all of
    /// them, each prompt once however often it appears (a job's negative prompt may be its
    /// prompt), then kept. One call, so encoders that come onto the device for it
    /// ([`super::TextPlacement::Visiting`]) come once for a job's prompt and negative
    /// prompt. An error is returned as it is, and nothing is kept. The lock is not held
    /// while encoding.
    pub fn get_or_encode_each<E>(
        &self,
        prompts: &[Vec<Vec<u32>>],
        encode: impl FnOnce(&[Vec<Vec<u32>>]) -> Result<Vec<EncodedPrompt>, E>,
    ) -> Result<Vec<EncodedPrompt>, E> {
        let mut found: Vec<Option<EncodedPrompt>> = Vec::with_capacity(prompts.len());
        let mut missing: Vec<Vec<Vec<u32>>> = Vec::new();
        {
            let mut entries = self.lock();
            for token_ids in prompts {
                let kept = entries
                    .iter()
                    .position(|entry| &entry.token_ids == token_ids)
                    .and_then(|position| entries.remove(position))
                    .map(|entry| {
                        let prompt = entry.prompt.clone();
                        entries.push_back(entry);
                        prompt
                    });
                if kept.is_none() && !missing.contains(token_ids) {
                    missing.push(token_ids.clone());
                }
                found.push(kept);
            }
        }
        let encoded = if missing.is_empty() {
            Vec::new()
        } else {
            encode(&missing)?
        };
        // One encoding per prompt `encode` was given, in their order (an answer short of one
        // leaves that prompt out of what is returned: the caller counts them).
        let encoded: Vec<(Vec<Vec<u32>>, EncodedPrompt)> =
            missing.into_iter().zip(encoded).collect();
        self.encoded
            .fetch_add(encoded.len() as u64, Ordering::Relaxed);
        if self.capacity > 0 {
            let mut entries = self.lock();
            for (token_ids, prompt) in &encoded {
                // Another caller may have encoded the same prompt meanwhile: one entry each.
                entries.retain(|entry| &entry.token_ids != token_ids);
                while entries.len() >= self.capacity {
                    entries.pop_front();
                }
                entries.push_back(Entry {
                    token_ids: token_ids.clone(),
                    prompt: prompt.clone(),
                });
            }
        }
        Ok(prompts
            .iter()
            .zip(found)
            .filter_map(|(token_ids, kept)| {
                kept.or_else(|| {
                    encoded
                        .iter()
                        .find(|(encoded_ids, _)| encoded_ids == token_ids)
                        .map(|(_, prompt)| prompt.clone())
                })
            })
            .collect())
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

    /// A stand-in encoder: the token ids (the prompt's bytes) as the hidden states.
    fn encoding(token_ids: &[Vec<u32>]) -> Result<EncodedPrompt, String> {
        let values: Vec<f32> = token_ids.concat().into_iter().map(|id| id as f32).collect();
        let length = values.len();
        Ok(EncodedPrompt {
            hidden_states: Tensor::from_vec(values, (1, length), &Device::Cpu)
                .map_err(|error| error.to_string())?,
            pooled: None,
        })
    }

    /// The stand-in over each prompt it is given, counting the prompts in `encoded`.
    fn encode_each(
        prompts: &[Vec<Vec<u32>>],
        encoded: &mut Vec<Vec<Vec<u32>>>,
    ) -> Result<Vec<EncodedPrompt>, String> {
        encoded.extend(prompts.iter().cloned());
        prompts
            .iter()
            .map(|token_ids| encoding(token_ids))
            .collect()
    }

    /// The stand-in over each prompt it is given.
    fn prompts_encoded(prompts: &[Vec<Vec<u32>>]) -> Result<Vec<EncodedPrompt>, String> {
        encode_each(prompts, &mut Vec::new())
    }

    fn values(prompt: &EncodedPrompt) -> Vec<f32> {
        prompt
            .hidden_states
            .flatten_all()
            .and_then(|flat| flat.to_vec1())
            .expect("readable")
    }

    /// Runs `prompts` through `cache` one at a time, counting the encoder's runs.
    fn run(cache: &PromptCache, prompts: &[&str]) -> (usize, Vec<Vec<f32>>) {
        let mut encoded = Vec::new();
        let outputs = prompts
            .iter()
            .map(|prompt| {
                let found = cache
                    .get_or_encode_each(&[tokens(prompt)], |missing| {
                        encode_each(missing, &mut encoded)
                    })
                    .expect("encodes");
                assert_eq!(found.len(), 1);
                values(&found[0])
            })
            .collect();
        (encoded.len(), outputs)
    }

    #[test]
    fn a_repeated_prompt_is_encoded_once_and_each_prompt_gets_its_own_encoding() {
        let cache = PromptCache::default();
        let prompts = ["", "a fox", "", "a cat", "a fox", ""];
        let (runs, outputs) = run(&cache, &prompts);
        assert_eq!(runs, 3);
        assert_eq!(cache.encoded(), 3);
        for (output, prompt) in outputs.iter().zip(prompts) {
            let expected = encoding(&tokens(prompt)).expect("encodes");
            assert_eq!(output, &values(&expected), "{prompt:?}");
        }
    }

    #[test]
    fn a_jobs_missing_prompts_are_encoded_in_one_call_each_once_and_answered_in_order() {
        let cache = PromptCache::default();
        run(&cache, &["blurry"]);
        let mut calls = Vec::new();
        let prompts = ["a fox", "blurry", "a cat", "a fox"].map(tokens);
        let found = cache
            .get_or_encode_each(&prompts, |missing| {
                calls.push(missing.to_vec());
                prompts_encoded(missing)
            })
            .expect("encodes");
        // One call with the two new prompts, the repeated one once; the kept one not again.
        assert_eq!(calls, vec![vec![tokens("a fox"), tokens("a cat")]]);
        assert_eq!(cache.encoded(), 1 + 2);
        let expected: Vec<Vec<f32>> = prompts
            .iter()
            .map(|token_ids| values(&encoding(token_ids).expect("encodes")))
            .collect();
        assert_eq!(found.iter().map(values).collect::<Vec<_>>(), expected);
        // All of them kept: no call at all the next time.
        let again = cache.get_or_encode_each(&prompts, |_| Err("encoded again".to_owned()));
        assert_eq!(again.map(|found| found.len()), Ok(4));

        // A prompt that is its own negative prompt, with nothing kept: encoded once.
        let uncached = PromptCache::with_capacity(0);
        let mut encoded = Vec::new();
        let twice = [tokens("a fox"), tokens("a fox")];
        let found = uncached
            .get_or_encode_each(&twice, |missing| encode_each(missing, &mut encoded))
            .expect("encodes");
        assert_eq!((encoded.len(), found.len()), (1, 2));
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
        let mut encoded = Vec::new();
        for token_ids in [first.clone(), second, first] {
            cache
                .get_or_encode_each(&[token_ids], |missing| encode_each(missing, &mut encoded))
                .expect("encodes");
        }
        assert_eq!(encoded.len(), 2);
    }

    #[test]
    fn a_failed_encoding_is_reported_and_not_kept() {
        let cache = PromptCache::default();
        let failed = cache.get_or_encode_each(&[tokens("a"), tokens("b")], |_| {
            Err::<Vec<EncodedPrompt>, _>("no memory")
        });
        assert_eq!(failed.err(), Some("no memory"));
        assert_eq!(
            run(&cache, &["a", "b"]).0,
            2,
            "encoded again after the failure"
        );
        assert_eq!(cache.encoded(), 2);
    }

    #[test]
    fn a_cache_of_no_entries_encodes_every_time() {
        let cache = PromptCache::with_capacity(0);
        assert_eq!(run(&cache, &["a", "a"]).0, 2);
    }
}
