//! Secrets (the auth token, the registration secret) and the one way to make new ones.
//!
//! A [`Secret`] cannot be printed: its `Debug` is masked and it has no `Display`, so a
//! secret that ends up in a log line or an error message by accident shows `Secret(…)`.
//! The only way to the raw text is [`Secret::expose`], which is easy to grep for.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Text that must never reach a log, the UI (unmasked), an error message or a crash report.
///
/// Equality takes the same time wherever two secrets differ (only their lengths leak), so a
/// local program that guesses the control token learns nothing from how fast it is refused.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        subtle::ConstantTimeEq::ct_eq(self.0.as_bytes(), other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The raw text, for the one place that has to send it (an HTTP header, the config file).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `abcd…wxyz` for showing a person which token this is without showing the token.
    /// Short secrets are masked entirely, since four characters at each end would be most of them.
    pub fn masked(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() < 16 {
            return "••••".to_owned();
        }
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}…{tail}")
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Secrets this process holds besides the settings' own (the control channel's token, the
/// Hugging Face token): crash reports and error texts hide them too.
static KNOWN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Remembers `secret` until the process ends, so that no report or error text shows it.
/// Short ones are left out: they would blank out ordinary words, and real secrets are long.
pub fn keep_hidden(secret: &Secret) {
    if secret.0.len() < 8 {
        return;
    }
    // A poisoned lock only means a panic elsewhere while it was held; the list is intact.
    let mut known = KNOWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !known.contains(&secret.0) {
        known.push(secret.0.clone());
    }
}

/// The secrets [`keep_hidden`] was given.
pub fn known() -> Vec<String> {
    KNOWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// `text` with every secret [`keep_hidden`] was given replaced by `[secret]`.
pub fn hide_known(text: &str) -> String {
    let mut text = text.to_owned();
    for secret in known() {
        if text.contains(&secret) {
            text = text.replace(&secret, "[secret]");
        }
    }
    text
}

/// The OS has no usable entropy source. There is no fallback: a guessable secret or install
/// id would let anyone on the internet impersonate this machine.
#[derive(Debug, thiserror::Error)]
#[error(
    "the operating system's random number generator failed ({0}); refusing to invent a guessable secret"
)]
pub struct NoEntropy(getrandom::Error);

/// `N` bytes from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], NoEntropy> {
    let mut bytes = [0_u8; N];
    getrandom::fill(&mut bytes).map_err(NoEntropy)?;
    Ok(bytes)
}

/// A fresh random token: 32 bytes from the OS CSPRNG as 64 lowercase hex characters.
pub fn new_token() -> Result<Secret, NoEntropy> {
    Ok(Secret(hex::encode(random_bytes::<32>()?)))
}

/// A fresh registration secret (studio-api.md §1: 64 lowercase hex characters).
pub fn new_registration_secret() -> Result<Secret, NoEntropy> {
    new_token()
}

/// A fresh install id: a random (version 4) UUID from the OS CSPRNG.
pub fn new_install_id() -> Result<String, NoEntropy> {
    let uuid = uuid::Builder::from_random_bytes(random_bytes::<16>()?).into_uuid();
    Ok(uuid.hyphenated().to_string())
}

/// Lowercase hex SHA-256 of the secret's text: what the studio stores instead of the secret.
pub fn sha256_hex(secret: &Secret) -> String {
    hex::encode(Sha256::digest(secret.expose().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let secret = Secret::new("tok_0123456789abcdef0123456789");
        assert_eq!(format!("{secret:?}"), "Secret(…)");
        assert_eq!(
            format!("{:?}", Some(&secret)),
            "Some(Secret(…))",
            "nested Debug stays masked"
        );
    }

    #[test]
    fn kept_secrets_are_hidden_from_text() {
        let token = Secret::new("ctl_0123456789abcdef_kept");
        assert!(hide_known("token ctl_0123456789abcdef_kept").contains("ctl_"));
        keep_hidden(&token);
        keep_hidden(&Secret::new("short"));
        assert_eq!(
            hide_known("token ctl_0123456789abcdef_kept, short"),
            "token [secret], short"
        );
    }

    #[test]
    fn equality_compares_the_whole_text() {
        let token = Secret::new("a".repeat(64));
        assert_eq!(token, Secret::new("a".repeat(64)));
        assert_ne!(token, Secret::new(format!("{}b", "a".repeat(63))));
        assert_ne!(
            token,
            Secret::new("a".repeat(63)),
            "a prefix is not the token"
        );
        assert_ne!(token, Secret::new(""));
    }

    #[test]
    fn masked_shows_only_the_ends() {
        assert_eq!(Secret::new("abcd0123456789wxyz").masked(), "abcd…wxyz");
        assert_eq!(Secret::new("short-token").masked(), "••••");
    }

    #[test]
    fn registration_secret_is_64_lowercase_hex_and_fresh_each_time() {
        let a = new_registration_secret().unwrap();
        let b = new_registration_secret().unwrap();
        assert_eq!(a.expose().len(), 64);
        assert!(
            a.expose()
                .chars()
                .all(|c| matches!(c, '0'..='9' | 'a'..='f'))
        );
        assert_ne!(a, b);
    }

    #[test]
    fn install_id_is_a_v4_uuid() {
        let install_id = new_install_id().unwrap();
        let uuid = uuid::Uuid::parse_str(&install_id).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
        assert_eq!(install_id, install_id.to_lowercase());
    }

    #[test]
    fn hash_is_sha256_of_the_hex_text() {
        // sha256("abc"), a published test vector.
        assert_eq!(
            sha256_hex(&Secret::new("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
