//! Taking what identifies the person out of text that leaves this PC: the error a job failed
//! with (`fail.error`, which the studio's operators read) and crash reports.
//!
//! Library errors carry file paths (candle names the weight file it could not open), and paths
//! carry user names. [`for_studio`] replaces the home folder with `~` and then every absolute
//! path with its file name (`/home/alice/models/unet/model.safetensors: not found` becomes
//! `model.safetensors: not found`), and hides every secret [`crate::secret`] knows of.

use std::sync::OnceLock;

/// Characters that end a path (or may come right before one).
const PATH_BOUNDARIES: &[char] = &[
    ' ', '\t', '\n', '\r', '"', '\'', '`', '(', ')', '[', ']', '<', '>', ',', ';', '=',
];

/// `text` fit for the studio: no home folder, no absolute path, no known secret.
pub fn for_studio(text: &str) -> String {
    let text = crate::secret::hide_known(text);
    without_paths(&text, home_folder())
}

/// The person's home folder, as paths spell it (`None`: none, or `/`).
pub fn home_folder() -> Option<&'static str> {
    static HOME: OnceLock<Option<String>> = OnceLock::new();
    HOME.get_or_init(|| {
        directories::BaseDirs::new()
            .map(|dirs| dirs.home_dir().to_string_lossy().into_owned())
            // "/" as a home folder (a service account) would turn every path into "~".
            .filter(|home| home.len() > 1)
    })
    .as_deref()
}

/// `home` becomes `~`, then every absolute path (`/…`, `~/…`, `C:\…`, `\\server\…`) becomes
/// its last component.
pub fn without_paths(text: &str, home: Option<&str>) -> String {
    let text = match home.filter(|home| home.len() > 1) {
        Some(home) => text.replace(home, "~"),
        None => text.to_owned(),
    };
    let mut kept = String::with_capacity(text.len());
    let mut rest = text.as_str();
    let mut after_boundary = true;
    while let Some(next) = rest.chars().next() {
        if after_boundary && starts_a_path(rest) {
            let end = rest
                .char_indices()
                .find(|(at, c)| PATH_BOUNDARIES.contains(c) || rest[*at..].starts_with(": "))
                .map_or(rest.len(), |(at, _)| at);
            let path = rest[..end].trim_end_matches(['.', ':']);
            let name = path
                .rsplit(['/', '\\'])
                .find(|part| !part.is_empty() && *part != "~")
                .unwrap_or("…");
            kept.push_str(name);
            rest = &rest[path.len()..];
            after_boundary = false;
            continue;
        }
        kept.push(next);
        after_boundary = PATH_BOUNDARIES.contains(&next) || next == ':';
        rest = &rest[next.len_utf8()..];
    }
    kept
}

fn starts_a_path(text: &str) -> bool {
    let bytes = text.as_bytes();
    match bytes {
        [b'/', next, ..] => !next.is_ascii_whitespace() && *next != b'/',
        [b'~', b'/' | b'\\', ..] | [b'\\', b'\\', ..] => true,
        [drive, b':', b'\\' | b'/', ..] => drive.is_ascii_alphabetic(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_file_names_and_the_home_folder_goes() {
        let home = Some("/home/alice");
        let cases = [
            (
                "cannot open /home/alice/.cache/hf/snapshots/abc/unet/model.safetensors: not found",
                "cannot open model.safetensors: not found",
            ),
            (
                "/opt/models/sd/vae/w.safetensors: No such file or directory (os error 2)",
                "w.safetensors: No such file or directory (os error 2)",
            ),
            (
                r"file C:\Users\Bob\models\unet.safetensors is truncated",
                "file unet.safetensors is truncated",
            ),
            (r"at \\nas\share\models\x.bin, retry", "at x.bin, retry"),
            (
                "weights in \"/srv/m/text_encoder/model.safetensors\"",
                "weights in \"model.safetensors\"",
            ),
            ("see /home/alice.", "see ~."),
        ];
        for (text, expected) in cases {
            assert_eq!(without_paths(text, home), expected, "{text}");
        }
    }

    #[test]
    fn what_is_not_a_path_stays() {
        for text in [
            "the engine ran out of memory (needs 2.5 GB, 1/2 free)",
            "https://huggingface.co/stabilityai/sd-turbo answered 404",
            "steps must be from 1 to 150 (got 151)",
            "and/or a ratio 16:9",
            "a lone / slash",
        ] {
            assert_eq!(without_paths(text, Some("/home/alice")), text);
        }
    }

    #[test]
    fn a_windows_home_folder_with_a_space_goes_whole() {
        assert_eq!(
            without_paths(
                r"cannot read C:\Users\Jane Doe\models\unet.safetensors",
                Some(r"C:\Users\Jane Doe")
            ),
            "cannot read unet.safetensors"
        );
    }
}
