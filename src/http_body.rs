//! Reading HTTP bodies with a ceiling: whatever a studio or a hub sends is bounded before it
//! is held in memory or parsed, so a broken or hostile server cannot make the worker allocate
//! without end.

/// The most a JSON answer may hold (the protocol's largest, a claimed job, is a few kB).
pub const MAX_JSON_BYTES: usize = 1 << 20;
/// The most of an error answer that is read, to make a message of.
pub const MAX_ERROR_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {}", crate::human::bytes(*limit as u64))]
    TooLarge { limit: usize },
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
}

/// The whole body, refused as soon as it is known to pass `limit` bytes (a declared length
/// is believed before anything is read; an undeclared one is counted as it arrives).
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The first `limit` bytes of the body at most (the rest is left unread); what arrived before
/// a broken transfer counts.
pub async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}
