//! Validated names that end up in paths, URLs and logs.

use std::fmt;

/// Longest model name accepted.
pub const MAX_MODEL_NAME: usize = 128;
/// Longest label key or value accepted.
pub const MAX_LABEL_PART: usize = 63;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {len} bytes, over the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error("name contains a path separator")]
    PathSeparator,
    #[error("name contains `..`")]
    DotDot,
    #[error("name starts with `.`")]
    LeadingDot,
    #[error("name contains control character {0:?}")]
    ControlCharacter(char),
    #[error("name contains {0:?}; only ASCII letters, digits, `-`, `_` and `.` are allowed")]
    Disallowed(char),
}

/// A model name that is safe to use as a directory name, a URL segment and a log field: ASCII
/// letters, digits, `-`, `_` and `.`, not starting with `.`, never containing `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelName(String);

impl ModelName {
    pub fn new(name: &str) -> Result<ModelName, NameError> {
        check_name(name, MAX_MODEL_NAME)?;
        Ok(ModelName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_name(name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            len: name.len(),
            max,
        });
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(NameError::ControlCharacter(c));
    }
    if name.contains(['/', '\\']) {
        return Err(NameError::PathSeparator);
    }
    if name.contains("..") {
        return Err(NameError::DotDot);
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError::Disallowed(c));
    }
    Ok(())
}

/// A device label `key=value`, as used by enrollment tokens and rollout selectors.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Label {
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(key: &str, value: &str) -> Result<Label, NameError> {
        check_name(key, MAX_LABEL_PART)?;
        check_name(value, MAX_LABEL_PART)?;
        Ok(Label {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Parses `key=value`.
    pub fn parse(text: &str) -> Result<Label, NameError> {
        let (key, value) = text.split_once('=').ok_or(NameError::Disallowed('='))?;
        Label::new(key, value)
    }

    /// Re-checks a label that arrived over the wire.
    pub fn validate(&self) -> Result<(), NameError> {
        check_name(&self.key, MAX_LABEL_PART)?;
        check_name(&self.value, MAX_LABEL_PART)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// True when every selector label is among `labels`. An empty selector matches every device.
pub fn selector_matches(selector: &[Label], labels: &[Label]) -> bool {
    selector.iter().all(|wanted| labels.contains(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_traversal_and_control() {
        assert_eq!(ModelName::new("../etc"), Err(NameError::PathSeparator));
        assert_eq!(ModelName::new(".."), Err(NameError::DotDot));
        assert_eq!(ModelName::new("a..b"), Err(NameError::DotDot));
        assert_eq!(ModelName::new(".hidden"), Err(NameError::LeadingDot));
        assert_eq!(
            ModelName::new("a\nb"),
            Err(NameError::ControlCharacter('\n'))
        );
        assert_eq!(ModelName::new("a b"), Err(NameError::Disallowed(' ')));
        assert_eq!(ModelName::new(""), Err(NameError::Empty));
        assert!(ModelName::new("vad-16k_v2.onnx").is_ok());
    }

    #[test]
    fn labels_parse() {
        assert_eq!(Label::parse("site=berlin"), Label::new("site", "berlin"));
        assert!(Label::parse("site").is_err());
        assert!(Label::parse("a=b/c").is_err());
    }
}
