//! Errors produced while loading or validating a configuration.

use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A source (the file, the environment) could not be parsed or has a value of the wrong type.
    #[error("cannot load configuration from {origin}: {}", join_key(key.as_deref(), message))]
    Parse {
        /// Where the bad input came from: the file path, or `environment`.
        origin: String,
        /// The offending key (`section.key`) when known.
        key: Option<String>,
        /// What is wrong, including the line when the parser reports one.
        message: String,
    },

    /// The configuration parsed but breaks a rule.
    #[error("invalid configuration: {key} = {value}: {problem}")]
    Invalid {
        /// The offending key, as `section.key`.
        key: String,
        /// The offending value as it would be written in the file (secrets are not shown).
        value: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
}

impl ConfigError {
    /// The `section.key` the error is about, when known.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { key, .. } => key.as_deref(),
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

fn join_key(key: Option<&str>, message: &str) -> String {
    match key {
        Some(key) => format!("{key}: {message}"),
        None => message.to_owned(),
    }
}
