//! Local model folders: the rules for the id a person gives one.

use super::catalog;

/// An id a person may not give a local folder: they choose another.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelIdError {
    #[error("model id {0:?} must be 1–64 letters, digits, '-', '_' or '.'")]
    Malformed(String),
    #[error("{0} is a catalog model's id; choose another name for a local folder")]
    CatalogId(String),
}

/// 1–64 letters, digits, `-`, `_` or `.`, and not a catalog model's id.
pub fn check_model_id(model_id: &str) -> Result<(), ModelIdError> {
    if model_id.is_empty()
        || model_id.len() > 64
        || !model_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ModelIdError::Malformed(model_id.to_owned()));
    }
    if catalog::find(model_id).is_some() {
        return Err(ModelIdError::CatalogId(model_id.to_owned()));
    }
    Ok(())
}

/// An id for a folder a person picked: its name, with anything not allowed turned to `-`.
pub fn suggest_model_id(folder: &std::path::Path) -> String {
    let name = folder.file_name().map_or_else(
        || "my-model".into(),
        |name| name.to_string_lossy().into_owned(),
    );
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() || catalog::find(&id).is_some() {
        id = format!("local-{}", id).chars().take(64).collect();
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_suggested_from_folder_names() {
        assert!(check_model_id("my-finetune_v2.1").is_ok());
        assert!(check_model_id("").is_err());
        assert!(check_model_id("has space").is_err());
        assert!(
            check_model_id("sd-turbo")
                .unwrap_err()
                .to_string()
                .contains("catalog")
        );
        assert_eq!(
            suggest_model_id(std::path::Path::new("/models/My Fine Tune")),
            "my-fine-tune"
        );
        assert_eq!(
            suggest_model_id(std::path::Path::new("/m/sd-turbo")),
            "local-sd-turbo"
        );
        assert!(check_model_id(&suggest_model_id(std::path::Path::new("/m/ünï"))).is_ok());
    }
}
