//! What can be wrong with the mesh configuration, said so an operator can fix it.
//!
//! Every problem names the file, the document index within it, the resource
//! (`Kind namespace/name`) and the field path (`spec.rules[0].to[1].operation.paths[2]`), then says
//! what would have been valid. A load produces all problems at once rather than stopping at the
//! first, so one edit can fix them all.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// A problem with one field of one resource, before we know which file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted field path from the document root, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl FieldError {
    /// A problem at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same problem, seen from an enclosing field: `prefix.field`.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Where a resource came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Origin {
    /// The file, relative to the configuration directory when loaded from one.
    pub file: Arc<PathBuf>,
    /// Zero-based index of the YAML document within the file.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)
    }
}

/// A problem with one resource, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {resource}: {error}")]
pub struct Invalid {
    /// The file and document.
    pub origin: Origin,
    /// `Kind namespace/name`, or as much of it as could be read.
    pub resource: String,
    /// The field and the message.
    pub error: FieldError,
}

/// Why a configuration could not become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What we tried to read.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// One or more resources are invalid; all of them are listed.
    #[error("{} invalid resource(s):\n{}", .0.len(), list(.0))]
    Invalid(Vec<Invalid>),
}

fn list(problems: &[Invalid]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// The located problems, if this error is about resource contents.
    pub fn problems(&self) -> &[Invalid] {
        match self {
            ConfigError::Invalid(problems) => problems,
            ConfigError::Io { .. } => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nests_field_paths() {
        let e = FieldError::new("paths[2]", "bad")
            .within("operation")
            .within("to[1]");
        assert_eq!(e.field, "to[1].operation.paths[2]");
        let e = FieldError::new("[0]", "bad").within("spec.rules");
        assert_eq!(e.field, "spec.rules[0]");
        let e = FieldError::new("", "bad").within("spec");
        assert_eq!(e.field, "spec");
    }
}
