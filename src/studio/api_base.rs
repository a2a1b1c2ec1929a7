//! The studio's base URL, checked once: `https://`, or plain `http://` only to a loopback host,
//! so the auth token never crosses a network in clear text (studio-api.md, introduction).

use std::net::IpAddr;

use reqwest::Url;

/// A base URL that passed [`ApiBase::parse`]; endpoints are built from it by path segments, so
/// ids are percent-encoded and can never change the path's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiBase(Url);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiBaseError {
    #[error("studio URL {0:?} is not a valid URL")]
    Invalid(String),
    #[error(
        "studio URL {0:?} uses plain http to a host that is not this computer; use https:// (plain http is allowed only for localhost, 127.x.x.x and ::1)"
    )]
    InsecureRemote(String),
    #[error("studio URL {0:?} must start with https://")]
    UnsupportedScheme(String),
    #[error("studio URL {0:?} must not contain a user name or password")]
    HasCredentials(String),
    #[error("studio URL {0:?} must not contain a query or fragment")]
    HasQuery(String),
}

impl ApiBase {
    pub fn parse(text: &str) -> Result<Self, ApiBaseError> {
        let trimmed = text.trim();
        let url = Url::parse(trimmed).map_err(|_| ApiBaseError::Invalid(trimmed.to_owned()))?;
        if url.cannot_be_a_base() || url.host().is_none() {
            return Err(ApiBaseError::Invalid(trimmed.to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            // Not echoed back: the text holds a password.
            return Err(ApiBaseError::HasCredentials(redact_userinfo(&url)));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ApiBaseError::HasQuery(trimmed.to_owned()));
        }
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => return Err(ApiBaseError::InsecureRemote(trimmed.to_owned())),
            _ => return Err(ApiBaseError::UnsupportedScheme(trimmed.to_owned())),
        }
        Ok(Self(url))
    }

    /// `<base>/<segment>/<segment>…`, each segment percent-encoded.
    pub fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.0.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            path.extend(segments);
        }
        // `path_segments_mut` only fails for cannot-be-a-base URLs, which `parse` refused.
        url
    }
}

impl std::fmt::Display for ApiBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

fn redact_userinfo(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_anywhere_and_http_only_to_loopback() {
        for ok in [
            "https://studio.minis.gg/api",
            "http://127.0.0.1:8080/api",
            "http://127.9.9.9",
            "http://localhost:3000",
            "http://LOCALHOST",
            "http://[::1]:9000/api/",
        ] {
            assert!(ApiBase::parse(ok).is_ok(), "{ok} should be accepted");
        }
        for insecure in [
            "http://studio.minis.gg/api",
            "http://192.168.1.10/api",
            "http://10.0.0.1",
            "http://localhost.evil.com",
            "http://[::2]/",
        ] {
            assert!(
                matches!(
                    ApiBase::parse(insecure),
                    Err(ApiBaseError::InsecureRemote(_))
                ),
                "{insecure} should be refused as insecure"
            );
        }
        assert!(matches!(
            ApiBase::parse("ftp://studio.minis.gg"),
            Err(ApiBaseError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            ApiBase::parse("studio.minis.gg"),
            Err(ApiBaseError::Invalid(_))
        ));
        assert!(matches!(ApiBase::parse(""), Err(ApiBaseError::Invalid(_))));
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_echoing_them() {
        let err = ApiBase::parse("https://bob:hunter2@studio.minis.gg/api").unwrap_err();
        assert!(matches!(err, ApiBaseError::HasCredentials(_)));
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn endpoints_join_and_encode_segments() {
        let base = ApiBase::parse("https://studio.minis.gg/api/").unwrap();
        assert_eq!(
            base.endpoint(&["workers", "register-request"]).as_str(),
            "https://studio.minis.gg/api/workers/register-request"
        );
        assert_eq!(
            base.endpoint(&["workers", "register-requests", "rr_1/../x?y"])
                .as_str(),
            "https://studio.minis.gg/api/workers/register-requests/rr_1%2F..%2Fx%3Fy"
        );
        let bare = ApiBase::parse("http://127.0.0.1:9").unwrap();
        assert_eq!(
            bare.endpoint(&["workers"]).as_str(),
            "http://127.0.0.1:9/workers"
        );
    }
}
