//! Request content types, matched exactly: the media type (`type/subtype`, case-insensitive)
//! must be one ladle reads, with any parameters after `;` (a `charset` must be UTF-8).
//! `application/jsonx` or `application/json-patch+json` are not JSON: they get 415
//! `unsupported_media_type` instead of being parsed as a recipe.

use crate::error::ErrorCode;

use super::ApiError;

/// Media types of mergekit-style YAML recipes.
pub const YAML_TYPES: [&str; 4] = [
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
];

/// How a request body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Yaml,
}

/// The format of a body sent with `content_type` (absent: JSON). YAML is accepted only when
/// `yaml` is true (merges; analyses take JSON only).
pub fn body_format(content_type: Option<&str>, yaml: bool) -> Result<BodyFormat, ApiError> {
    let Some(raw) = content_type else {
        return Ok(BodyFormat::Json);
    };
    let accepted = if yaml {
        "application/json or application/yaml"
    } else {
        "application/json"
    };
    let refuse = |why: String| {
        ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("content type {raw:?}: {why}; send {accepted}"),
        )
    };
    let mime: mime::Mime = raw
        .parse()
        .map_err(|_| refuse("not a valid media type".into()))?;
    if let Some(charset) = mime.get_param(mime::CHARSET)
        && !charset
            .as_str()
            .trim_matches('"')
            .eq_ignore_ascii_case("utf-8")
    {
        return Err(refuse(format!("charset {charset} is not UTF-8")));
    }
    let essence = mime.essence_str();
    if essence == "application/json" {
        Ok(BodyFormat::Json)
    } else if yaml && YAML_TYPES.contains(&essence) {
        Ok(BodyFormat::Yaml)
    } else {
        Err(refuse("unsupported media type".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_types_with_parameters() {
        let json = Ok(BodyFormat::Json);
        let yaml = Ok(BodyFormat::Yaml);
        let ok = |ct: &str, y: bool| body_format(Some(ct), y).map_err(|e| e.code);
        assert_eq!(body_format(None, true).map_err(|e| e.code), json);
        assert_eq!(ok("application/json", true), json);
        assert_eq!(ok("Application/JSON; charset=UTF-8", true), json);
        assert_eq!(ok("application/json;charset=\"utf-8\"", false), json);
        assert_eq!(ok("application/yaml; charset=utf-8", true), yaml);
        assert_eq!(ok("text/x-yaml", true), yaml);
        for bad in [
            "application/jsonx",
            "application/json-patch+json",
            "application/jsonl",
            "application/x-yamlx",
            "text/plain",
            "application/json; charset=latin1",
            "json",
            "",
        ] {
            assert_eq!(
                ok(bad, true),
                Err(ErrorCode::UnsupportedMediaType),
                "{bad:?} must be refused"
            );
        }
        assert_eq!(
            ok("application/yaml", false),
            Err(ErrorCode::UnsupportedMediaType)
        );
    }
}
