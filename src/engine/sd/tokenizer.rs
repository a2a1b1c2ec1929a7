//! The CLIP tokenizer: prompt text to the 77 token ids a CLIP text encoder reads.
//!
//! Loads `tokenizer.json` when the folder has one, and otherwise builds the same tokenizer
//! from `vocab.json` + `merges.txt` (what SD 1.5 and 2.1 ship): NFC, whitespace runs to one
//! space, lowercase, CLIP's word-splitting regex, byte-level BPE with a `</w>` word suffix.
//! Padding follows the folder's `tokenizer_config.json` (SD 1.5 pads with `<|endoftext|>`,
//! SD 2.x and SDXL's second tokenizer with `!`), so the ids match the reference exactly.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::model_folder::FolderError;

const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's word splitter (from the original `simple_tokenizer.py`).
const CLIP_WORDS: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    start_id: u32,
    end_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl ClipTokenizer {
    /// Loads the tokenizer in `root/<component>/` for a text encoder with
    /// `max_length` positions.
    pub fn load(root: &Path, component: &str, max_length: usize) -> Result<Self, FolderError> {
        let folder = root.join(component);
        let invalid = |file: &str, reason: String| FolderError::Invalid {
            file: format!("{component}/{file}"),
            reason,
        };
        let json_file = folder.join("tokenizer.json");
        let mut tokenizer = if json_file.is_file() {
            Tokenizer::from_file(&json_file)
                .map_err(|error| invalid("tokenizer.json", error.to_string()))?
        } else {
            build_from_vocab_and_merges(&folder, component)?
        };
        let pad_token = pad_token(&folder).unwrap_or_else(|| END_OF_TEXT.to_owned());
        // The reference registers its special tokens (the pad token too: `!` for SD 2.x) as
        // added tokens, so they match whole in a prompt before BPE sees them.
        tokenizer
            .add_special_tokens([
                AddedToken::from(START_OF_TEXT, true),
                AddedToken::from(END_OF_TEXT, true),
                AddedToken::from(pad_token.clone(), true),
            ])
            .map_err(|error| invalid("special tokens", error.to_string()))?;
        let id_of = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| invalid("vocab", format!("has no {token} token")))
        };
        let start_id = id_of(START_OF_TEXT)?;
        let end_id = id_of(END_OF_TEXT)?;
        let pad_id = id_of(&pad_token)?;
        if max_length < 2 {
            return Err(invalid("config", "max length below 2".to_owned()));
        }
        Ok(Self {
            tokenizer,
            start_id,
            end_id,
            pad_id,
            max_length,
        })
    }

    /// `<|startoftext|>`, the prompt's tokens (cut to fit), `<|endoftext|>`, then padding.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, tokenizers::Error> {
        let encoding = self.tokenizer.encode(prompt, false)?;
        let room = self.max_length - 2;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.start_id);
        ids.extend(encoding.get_ids().iter().take(room));
        ids.push(self.end_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    pub fn end_id(&self) -> u32 {
        self.end_id
    }
}

fn build_from_vocab_and_merges(folder: &Path, component: &str) -> Result<Tokenizer, FolderError> {
    let vocab = folder.join("vocab.json");
    let merges = folder.join("merges.txt");
    for (path, name) in [(&vocab, "vocab.json"), (&merges, "merges.txt")] {
        if !path.is_file() {
            return Err(FolderError::Missing {
                file: format!("{component}/tokenizer.json (or {name})"),
            });
        }
    }
    let invalid = |reason: String| FolderError::Invalid {
        file: format!("{component}/vocab.json + merges.txt"),
        reason,
    };
    let (Some(vocab), Some(merges)) = (vocab.to_str(), merges.to_str()) else {
        return Err(invalid("the folder's path is not valid UTF-8".to_owned()));
    };
    let model = BPE::from_file(vocab, merges)
        .unk_token(END_OF_TEXT.to_owned())
        .end_of_word_suffix("</w>".to_owned())
        .build()
        .map_err(|error| invalid(error.to_string()))?;
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".to_owned()),
        " ",
    )
    .map_err(|error| invalid(error.to_string()))?;
    let words = Split::new(
        SplitPattern::Regex(CLIP_WORDS.to_owned()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|error| invalid(error.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|error| invalid(error.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        words.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    Ok(tokenizer)
}

/// The pad token named in `tokenizer_config.json` or `special_tokens_map.json` (a string or
/// an `{"content": …}` object).
fn pad_token(folder: &Path) -> Option<String> {
    ["tokenizer_config.json", "special_tokens_map.json"]
        .iter()
        .find_map(|file| {
            let text = std::fs::read_to_string(folder.join(file)).ok()?;
            let json: Value = serde_json::from_str(&text).ok()?;
            match json.get("pad_token")? {
                Value::String(token) => Some(token.clone()),
                Value::Object(object) => object.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        })
}
